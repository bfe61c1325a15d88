"""Which device the heavy stages run on, and how many CPU threads they may use."""

import dagster as dg
import torch

from lqlora_dagster.pipeline.context import resolve_device


class ComputeDevice(dg.ConfigurableResource):
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    # CPU threads: torch's for most work, and how many matrices LQ decompositions run at
    # a time (one thread each, see lqlora_dagster/per_matrix_threads.py); 0: every core
    threads: int = 0

    def torch_device(self) -> torch.device:
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        return resolve_device(self.device)
