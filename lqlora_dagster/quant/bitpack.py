"""Dense bit packing of small unsigned codes (1..8 bits each) into bytes.

One general rule for every width, 3 bits included: code i occupies bits
[i*k, (i+1)*k) of the little-endian bit stream. Packed size is ceil(n*k/8) bytes.
"""

import torch


def packed_nbytes(n_codes: int, bits: int) -> int:
    return (n_codes * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of codes < 2**bits into ceil(n*bits/8) bytes."""
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"pack_bits expects 1-D uint8 codes, got {codes.dtype} {tuple(codes.shape)}")
    if bits == 8:
        return codes.clone()
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes[:, None] >> shifts) & 1).reshape(-1)  # (n*bits,) one bit per byte
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `n_codes` codes as a 1-D uint8 tensor."""
    if packed.numel() != packed_nbytes(n_codes, bits):
        raise ValueError(
            f"{packed.numel()} packed bytes cannot hold {n_codes} codes of {bits} bits "
            f"(expected {packed_nbytes(n_codes, bits)})"
        )
    if bits == 8:
        return packed.clone()
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)[: n_codes * bits]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(n_codes, bits) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)
