"""A tiny model and its checkpoint for the reliability tests: real enough to load, offload and run, small
enough that a load takes milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from bigload.empty import init_empty_weights
from bigload.load.store import DiskStore

# Layers 0 and 1 and the head go to disk, the rest stays on the CPU.
DISK_MAP = {"": "cpu", "embed": "cpu", "layers.0": "disk", "layers.1": "disk", "layers.2": "cpu", "head": "disk"}
INPUT = torch.linspace(-1, 1, 16).reshape(2, 8)


class Tiny(nn.Module):
    """Five blocks of linear layers and a buffer; forward is deterministic."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
        self.head = nn.Linear(32, 4)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.embed(x))
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x) * self.scale


def reference(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def save_reference(folder: Path, seed: int = 0) -> Path:
    """`reference(seed)` as `folder/model.safetensors`; returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference(seed).state_dict().items()}, path)
    return path


def meta_tiny() -> Tiny:
    with init_empty_weights():
        return Tiny().eval()


def run_with_store(model: nn.Module, store: DiskStore | None) -> torch.Tensor:
    """The model's output once the store's tensors are brought in (what the hooks do at runtime)."""
    if store is not None:
        # Open it again, as the hooks do: a store must be readable from its folder alone.
        fresh = DiskStore.open(store.folder)
        state = {name: fresh.get(name).to(torch.float32) for name in fresh.names}
        model.load_state_dict(state, strict=False, assign=True)
    with torch.no_grad():
        return model.float()(INPUT)


def expected_output(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference model's output with its weights rounded to `dtype` (what a cast load gives)."""
    with torch.no_grad():
        return reference(seed).to(dtype).float()(INPUT)


def folder_is_clean(folder: Path) -> list[str]:
    """Files in an offload folder that no committed index accounts for (temp files, orphan .dat files)."""
    if not folder.exists():
        return []
    names = {p.name for p in folder.iterdir()}
    listed: set[str] = set()
    index = folder / "index.json"
    if index.is_file():
        import json

        listed = {"index.json", "bigload.json"} | {f"{name}.dat" for name, entry in json.loads(index.read_text()).items()
                                                   if "safetensors_file" not in entry}
    return sorted(names - listed)
