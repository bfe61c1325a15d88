"""Dense bit packing of small unsigned codes (1..8 bits each) into bytes.

One rule for every width, 3 bits included: code i occupies bits [i*k, (i+1)*k) of
the little-endian bit stream, so packed size is ceil(n*k/8) bytes. Eight k-bit codes
fill exactly k bytes; both directions work on those groups as one int64 word.
"""

import torch


def packed_nbytes(n_codes: int, bits: int) -> int:
    return (n_codes * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be 1..8, got {bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of codes < 2**bits into ceil(n*bits/8) bytes."""
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"pack_bits expects 1-D uint8 codes, got {codes.dtype} {tuple(codes.shape)}")
    n = codes.numel()
    if bits == 8:
        return codes.clone()
    padded = torch.nn.functional.pad(codes, (0, (-n) % 8)).to(torch.int64).reshape(-1, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (padded << shifts).sum(dim=1)  # (groups,) 8*bits meaningful bits each
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    packed = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_nbytes(n, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `n_codes` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.numel() != packed_nbytes(n_codes, bits):
        raise ValueError(
            f"{packed.numel()} packed bytes cannot hold {n_codes} codes of {bits} bits "
            f"(expected {packed_nbytes(n_codes, bits)})"
        )
    if bits == 8:
        return packed.clone()
    padded = torch.nn.functional.pad(packed, (0, (-packed.numel()) % bits)).to(torch.int64).reshape(-1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (padded << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = ((words[:, None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)
    return codes[:n_codes]
