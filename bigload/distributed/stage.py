"""What one rank keeps of the model: its decoder blocks, placeholders for the modules other ranks hold, and the
checkpoint tensors it loads.

Every rank builds the whole model on meta, then `cut_to_stage` removes the decoder blocks other ranks run
(the rest keep their names, so device-map keys and checkpoint names still match) and puts `Elsewhere`
placeholders where rank 0's ends (embeddings, final norm, head) would be. `stage_selector` says which
checkpoint tensors the stage loads from the shard index alone, so shards holding none are never opened.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bigload.devices import Device
from bigload.errors import DistributedError, PlanError
from bigload.formats.discover import checkpoint_tensor_names
from bigload.integrations.hf import model_tensor_names
from bigload.plan.hosts import HostPlan, HostSplit, Stage
from bigload.tensors import owner_of

__all__ = ["CACHE_KEYS", "Elsewhere", "base_model", "check_layer_types", "cut_to_stage", "entry_device", "stack_of",
           "stage_selector"]

CACHE_KEYS = ("cache", "past_key_values")  # the base model's KV-cache keyword: transformers 5.24 renamed it


class Elsewhere(nn.Module):
    """Stands for a module whose weights live on another rank; holds no tensor.

    When the model's own forward still calls it on this rank (GPT-2 adds position embeddings before the
    first block; every model applies its final norm after the last), it returns its input when the real
    module's output would have the input's shape and dtype (a norm), else zeros of the real output's shape
    (an embedding). Either way the stage's first block then receives the hidden state from the wire, so the
    value never reaches a computation. Shapes come from running the real module on meta tensors.
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.__dict__["_meta"] = module.to("meta")  # not a submodule: no tensors, no state-dict entries
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        to_meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = self._meta(*map(to_meta, args), **{k: to_meta(v) for k, v in kwargs.items()})
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if not isinstance(out, torch.Tensor) or first is None:
            raise DistributedError(f"{self.name} runs on another rank and its output here cannot be stood for.")
        if first.shape == out.shape and first.dtype == out.dtype:
            return first
        return torch.zeros(out.shape, dtype=out.dtype, device=first.device)

    def extra_repr(self) -> str:
        return f"{self.name} (on another rank)"


def stack_of(model: nn.Module, split: HostSplit) -> tuple[str, nn.Module]:
    """The name and module of the container holding the decoder blocks (e.g. `model.layers`)."""
    name = split.layers[0].rpartition(".")[0]
    return name, model.get_submodule(name)


def base_model(model: nn.Module, split: HostSplit) -> nn.Module:
    """The module whose forward runs the decoder stack (the stack's container's parent)."""
    return model.get_submodule(stack_of(model, split)[0].rpartition(".")[0])


def cut_to_stage(model: nn.Module, split: HostSplit, stage: Stage) -> None:
    """Keep only `stage`'s blocks in `model` (meta): other decoder blocks leave the stack (the rest keep
    their names, so device-map keys and checkpoint names still match), other ends become `Elsewhere`."""
    container_name, container = stack_of(model, split)
    owned = set(split.layers[stage.first_layer:stage.end_layer])
    container._modules = OrderedDict(
        (key, module) for key, module in container._modules.items() if f"{container_name}.{key}" in owned)
    for name in split.ends:
        if name not in stage.blocks:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, Elsewhere(model.get_submodule(name), name))


def check_layer_types(model: nn.Module) -> None:
    """Refuse models whose stack mixes layer kinds: their masks are chosen by a block's position in the full
    stack, which a cut stack no longer has.

    Raises:
        PlanError: the config's `layer_types` holds more than one kind.
    """
    kinds = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(set(kinds)) > 1:
        raise PlanError(
            f"{type(model).__name__} mixes layer kinds ({', '.join(sorted(set(map(str, kinds))))}); its masks are "
            "chosen by position in the stack, which a split stack no longer keeps. Run it on one host."
        )


def entry_device(host_plan: HostPlan, rank: int) -> Device:
    """Where rank `rank`'s first block runs: the hidden state it receives goes there."""
    split = host_plan.split
    layer = split.layers[split.stages[rank].first_layer]
    devices = host_plan.plans[rank].execution_devices
    owner = owner_of(layer, devices)
    if owner is None:
        raise PlanError(f"rank {rank}'s plan places none of {layer}; plan the hosts again (plan_hosts).")
    return devices[owner]


def stage_selector(model: nn.Module, checkpoint: Path, stage: Stage) -> Callable[[str], bool]:
    """Which checkpoint tensors this stage loads (by the model names they load into): decided from the
    shard index's names alone, so shards holding none are never opened."""
    prefixes = tuple(name + "." for name in stage.modules)
    mapping = model_tensor_names(model, checkpoint_tensor_names(checkpoint))
    wanted = frozenset(key for key, name in mapping.items() if name.startswith(prefixes))
    return wanted.__contains__
