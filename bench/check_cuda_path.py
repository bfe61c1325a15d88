"""The CUDA path against the CPU path, for a machine with a GPU (CI has none, so this is
a device check, not a test): the packed matrices decode to the same bits on the GPU as
the CPU reference for every config of the grid and odd shapes; quantizing on the GPU
gives the CPU's codes; an LQ layer's output and gradients agree; an LQ decomposition
and the error table's fast rows run there, timed against the CPU.

    python -m bench.check_cuda_path [--device cuda]
    python -m bench.check_cuda_path --smoke --device cpu    # small shapes, every 36th config

Exits 1 when a bit-exactness check fails."""

import argparse
import sys
import time

import torch

from bench._common import add_smoke, stamp

SHAPES = [(192, 576), (37, 29), (5, 3), (129, 65), (576, 1536)]
SMOKE_SHAPES = [(37, 29), (5, 3), (64, 48)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def check_decode(device: torch.device, shapes: list[tuple[int, int]], stride: int = 1) -> int:
    """Decode on the device vs the CPU reference, and codes quantized on the device vs
    on the CPU: every `stride`-th config of the grid (and odd blocks) on every shape."""
    from lqlora_dagster.quant.config import CONFIG_GRID, QuantConfig
    from lqlora_dagster.quant.matrix import QuantizedMatrix

    configs = (*CONFIG_GRID[::stride], QuantConfig(3, 3, "fp16", 12, 5), QuantConfig(4, 2, "bf16", 7, 3))
    print("\n| shape | configs | decode on device = CPU reference | weights decoded differently | "
          "largest relative difference of a decoded weight | codes quantized on device = CPU's | "
          "largest decoded difference where codes differ |\n|---|---|---|---|---|---|---|")
    failures = 0
    for shape in shapes:
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.02
        W[0, :3] = 0.0
        decode_same = codes_same = differing = 0
        worst = worst_decode = 0.0
        for cfg in configs:
            qm = QuantizedMatrix.quantize(W, cfg)
            reference = qm.reference_dequantize()
            decoded = qm.to(device).dequantize().cpu()
            decode_same += same_bits(decoded, reference)
            differing += int((decoded != reference).sum())
            gap = (decoded - reference).abs() / reference.abs().clamp_min(1e-30)
            worst_decode = max(worst_decode, float(gap[reference != 0].max()) if (reference != 0).any() else 0.0)
            on_device = QuantizedMatrix.quantize(W.to(device), cfg).to("cpu")
            if all(torch.equal(a, b) for a, b in zip(on_device._buffers(), qm._buffers())):
                codes_same += 1
            else:
                worst = max(worst, float((on_device.reference_dequantize() - reference).abs().max()))
        failures += len(configs) - decode_same
        print(f"| {shape[0]} x {shape[1]} | {len(configs)} | {decode_same} | {differing / (len(configs) * W.numel()):.2%} | "
              f"{worst_decode:.2e} | {codes_same} | {worst:.3g} |", flush=True)
    return failures


def check_layer(device: torch.device) -> None:
    """An LQ layer's forward and factor gradients on the device vs the CPU."""
    from lqlora_dagster.quant.config import CONFIG_GRID
    from lqlora_dagster.quant.matrix import QuantizedMatrix
    from lqlora_dagster.surgery.lq_linear import LQLinear

    torch.manual_seed(0)
    W, L1, L2, x = torch.randn(384, 256), torch.randn(384, 16) * 0.1, torch.randn(16, 256) * 0.1, torch.randn(4, 7, 256)
    out = {}
    for dev in (torch.device("cpu"), device):
        layer = LQLinear(QuantizedMatrix.quantize(W, CONFIG_GRID[100]), L1.clone(), L2.clone()).to(dev)
        y = layer(x.to(dev))
        y.square().sum().backward()
        out[dev.type] = (y.detach().cpu(), layer.L1.grad.cpu(), layer.L2.grad.cpu())
    diffs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(out[device.type], out["cpu"])]
    print(f"\nLQ layer on {device} vs CPU, largest relative difference: output {diffs[0]:.2e}, "
          f"dL1 {diffs[1]:.2e}, dL2 {diffs[2]:.2e}")


def check_decomposition(device: torch.device, size: int = 2048, rows_size: int = 576) -> None:
    """One LQ decomposition (size x size) and one matrix's fast error-table rows
    (rows_size x rows_size) on each device."""
    from lqlora_dagster.decompose.lq import LQSettings
    from lqlora_dagster.error_estimation.estimates import FastSettings, estimated_errors
    from lqlora_dagster.methods import get_method
    from lqlora_dagster.quant.config import CONFIG_GRID, QuantConfig

    W = torch.randn(size, size, generator=torch.Generator().manual_seed(0)) * 0.02
    cfg = QuantConfig.parse("nf3-b08-fp32-B064-B1256")
    print("\n| work (rank 16) | device | seconds | error |\n|---|---|---|---|")
    for dev in (torch.device("cpu"), device):
        d, s = timed(lambda dev=dev: get_method("lqlora").decompose(W.to(dev), cfg, LQSettings(rank=16)), dev)
        print(f"| LQ decomposition ({size} x {size}), {cfg.name} | {dev} | {s:.2f} | {d.error:.5g} |", flush=True)
    W = W[:rows_size, :rows_size].contiguous()  # SmolLM2-sized: keeps the CPU side short
    rows = {}
    for dev in (torch.device("cpu"), device):
        found, s = timed(lambda dev=dev: estimated_errors(W.to(dev), CONFIG_GRID, LQSettings(rank=16), None, FastSettings()), dev)
        rows[dev.type] = torch.tensor([r.error for r in found])
        print(f"| fast error-table rows ({rows_size} x {rows_size}), {len(CONFIG_GRID)} configs | {dev} | {s:.2f} | "
              f"sum {float(rows[dev.type].sum()):.5g} |", flush=True)
    gap = ((rows[device.type] - rows["cpu"]).abs() / rows["cpu"]).max()
    print(f"\nfast rows on {device} vs CPU: largest relative difference of a row {float(gap):.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    add_smoke(p)
    args = p.parse_args()
    device = torch.device(args.device)
    print(stamp())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}")
    failures = check_decode(device, SMOKE_SHAPES, 36) if args.smoke else check_decode(device, SHAPES)
    check_layer(device)
    check_decomposition(device, *((128, 64) if args.smoke else ()))
    print(f"\ndecode mismatches: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
