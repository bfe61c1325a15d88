"""Which device the heavy stages run on, and how many CPU threads torch may use."""

import dagster as dg
import torch

from lqlora_dagster.pipeline.context import resolve_device


class ComputeDevice(dg.ConfigurableResource):
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default

    def torch_device(self) -> torch.device:
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        return resolve_device(self.device)
