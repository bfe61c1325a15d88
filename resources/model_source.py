"""Where base models come from: the bundled packages (converted and cached under
`cache_dir`) or local Hugging Face folders, as registered in the warehouse."""

from pathlib import Path

import dagster as dg


class ModelSource(dg.ConfigurableResource):
    cache_dir: str  # converted bundled models (e.g. SmolLM2's GGUF as fp32 safetensors)
    inbox_dir: str  # HF folders dropped here are registered by the sensor

    def cache(self) -> Path:
        return Path(self.cache_dir)

    def inbox(self) -> Path:
        return Path(self.inbox_dir)
