"""PEFT's LoftQ initialisation (what people use today) against ours, on the same model and
machine: wall time and the memory each adds, every run in a fresh process. PEFT's LoftQ
needs bitsandbytes and a CUDA or XPU device; where it cannot run, the error is printed
as PEFT raised it.

    python -m bench.bench_peft_loftq --model MODEL_FOLDER [--layers 2] [--rank 16] [--bnb PATH] [--device cuda]

--layers limits both sides to the first N transformer blocks (the same matrices);
--bnb is a folder holding bitsandbytes (`pip install --target PATH bitsandbytes`).
--smoke compares them on one block of the tiny Llama built in code, at rank 4."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import REPO, add_smoke, save_tiny_llama, stamp


def child(side: str, folder: str, layers: int, rank: int, device: str) -> dict:
    import torch

    from lqlora_dagster.memory import PeakMemory

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    from lqlora_dagster.models.targets import find_targets, target_weight

    device = torch.device(device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, before the baselines
    out: dict = {"side": side}
    with PeakMemory() as memory, PeakMemory(device) as on_device:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        targets = [t for t in find_targets(model) if t.layer < layers]
        try:
            if side == "peft":
                from peft import LoftQConfig, LoraConfig, get_peft_model

                names = sorted({t.name.rsplit(".", 1)[-1] for t in targets})
                config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights="loftq",
                                    layers_to_transform=list(range(layers)),
                                    loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=5))
                get_peft_model(model, config)
            else:
                from lqlora_dagster.decompose.lq import LQSettings
                from lqlora_dagster.methods import get_method
                from lqlora_dagster.quant.config import QLORA_NF4

                loftq = get_method("loftq")
                for t in targets:
                    loftq.decompose(target_weight(model, t).detach().to(device), QLORA_NF4, LQSettings(rank=rank))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out["seconds"] = time.perf_counter() - start
            out["matrices"] = len(targets)
        except Exception as err:  # report PEFT's own words
            out["error"] = f"{type(err).__name__}: {err}"
    out["added_mb"] = memory.added_mb
    out["device_mb"] = on_device.added_mb if device.type == "cuda" else float("nan")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--bnb", type=Path, default=None)
    p.add_argument("--device", default="cpu", help="where ours runs; PEFT's picks CUDA itself")
    add_smoke(p)
    args = p.parse_args()
    print(stamp())
    if args.smoke:
        args.layers, args.rank = 1, 4
        with tempfile.TemporaryDirectory() as tmp:
            args.model = save_tiny_llama(Path(tmp) / "tiny")
            compare(args)
        return
    if args.model is None:
        p.error("--model is required")
    compare(args)


def compare(args) -> None:
    """PEFT's LoftQ and ours, each in a fresh process."""
    env_path = [str(args.bnb)] if args.bnb else []
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*env_path, str(REPO), *inherited]))
    print("\n| init | matrices | seconds | added MB | GPU peak MB | result |\n|---|---|---|---|---|---|")
    for side, label in (("peft", "PEFT LoftQ (NF4, 5 iterations)"), ("ours", "lqlora-dagster LoftQ (NF4, 5 iterations)")):
        cmd = [sys.executable, "-m", "bench.bench_peft_loftq", "--child", side, str(args.model), str(args.layers), str(args.rank),
               args.device]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if done.returncode:
            print(f"| {label} | | | | | crashed: {done.stderr.strip().splitlines()[-1][:300]} |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        result = r.get("error", "ran")
        print(f"| {label} | {r.get('matrices', '')} | {r.get('seconds', float('nan')):.1f} | {r['added_mb']:,.0f} | "
              f"{r['device_mb']:,.0f} | {result[:300]} |")


if __name__ == "__main__":
    main()
