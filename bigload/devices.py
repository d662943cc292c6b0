"""Device and budget value types shared by every layer.

A device is a value, not a loose string: `Device.parse(0)`, `Device.parse("cuda:1")`, `Device.parse("cpu")`,
`Device.parse("disk")`. At the edges (device maps) it turns back into the ecosystem's format with `.key`:
GPU index as an int, "cpu", or "disk". Devices sort in placement order: GPUs by index, then cpu, then disk.
This module probes nothing; `budget.py` does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Union

import torch

from bigload.errors import DeviceError, DeviceNotFoundError, PlanError

__all__ = ["Budget", "Device", "DeviceKind", "DeviceLike", "ExecutionPolicy", "CPU", "DISK"]


class DeviceKind(enum.IntEnum):
    """Kinds of place a tensor can live, in placement order."""

    GPU = 0
    CPU = 1
    DISK = 2


@dataclass(frozen=True, order=True)
class Device:
    """Where a tensor lives. GPUs carry an index; `cpu` and `disk` have index 0."""

    kind: DeviceKind
    index: int = 0

    @staticmethod
    def parse(value: "DeviceLike") -> "Device":
        """Read 0, "0", "cuda", "cuda:1", torch.device("cuda", 1), "cpu", "disk" or a Device.

        Raises:
            DeviceNotFoundError: anything else, e.g. "meta", "gpu0", -1 (a DeviceError and a RuntimeError, as
                torch raises for a device string it does not know).
        """
        if isinstance(value, Device):
            return value
        if isinstance(value, torch.device):
            value = str(value)
        if isinstance(value, bool):
            raise DeviceNotFoundError(f"{value!r} is not a device; use a GPU index (0, 1, ...), 'cuda:N', 'cpu' or 'disk'.")
        if isinstance(value, int):
            if value < 0:
                raise DeviceNotFoundError(f"GPU index {value} is negative; use a GPU index (0, 1, ...), 'cuda:N', 'cpu' or 'disk'.")
            return Device(DeviceKind.GPU, value)
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "cpu":
                return CPU
            if text == "disk":
                return DISK
            if text.isdigit():
                return Device(DeviceKind.GPU, int(text))
            if text == "cuda":
                return Device(DeviceKind.GPU, 0)
            if text.startswith("cuda:") and text[5:].isdigit():
                return Device(DeviceKind.GPU, int(text[5:]))
        raise DeviceNotFoundError(
            f"unknown device {value!r}; use a GPU index (0, 1, ...), 'cuda:N', 'cpu' or 'disk'."
        )

    @property
    def is_gpu(self) -> bool:
        return self.kind is DeviceKind.GPU

    @property
    def key(self) -> int | str:
        """The device-map form: 0, 1, ... for GPUs, "cpu", "disk"."""
        if self.kind is DeviceKind.GPU:
            return self.index
        return "cpu" if self.kind is DeviceKind.CPU else "disk"

    def torch_device(self) -> torch.device:
        """The torch device tensors on this device live on. Disk has none: its tensors live in a store."""
        if self.kind is DeviceKind.GPU:
            return torch.device("cuda", self.index)
        if self.kind is DeviceKind.CPU:
            return torch.device("cpu")
        raise DeviceNotFoundError("'disk' is not a torch device; disk-offloaded tensors execute on a GPU or the CPU.")

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.is_gpu else str(self.key)


CPU = Device(DeviceKind.CPU)
DISK = Device(DeviceKind.DISK)

DeviceLike = Union[Device, int, str, torch.device]


@dataclass(frozen=True)
class Budget:
    """Bytes each device may hold, in placement order (GPUs by index, then cpu, then disk).

    Build one with `Budget.of({0: 24 * 2**30, "cpu": 64 * 2**30})` or with `budget.parse_max_memory`.
    A device absent from the budget gets nothing. `sources` says where a limit came from ("max_memory",
    "cgroup memory.max 3.0 GiB - usage ...", "psutil available"), so the pure planner can state it in
    `explain()` without probing; a device without an entry has no stated source.
    """

    limits: tuple[tuple[Device, int], ...]
    sources: tuple[tuple[Device, str], ...] = field(default=())

    @staticmethod
    def of(limits: Mapping[DeviceLike, int]) -> "Budget":
        parsed: dict[Device, int] = {}
        for key, nbytes in limits.items():
            device = Device.parse(key)
            if device in parsed:
                raise DeviceError(f"device {device} appears twice in the budget ({key!r}).")
            parsed[device] = int(nbytes)
        return Budget(tuple(sorted(parsed.items())))

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(device for device, _ in self.limits)

    @property
    def gpus(self) -> tuple[Device, ...]:
        return tuple(device for device in self.devices if device.is_gpu)

    def get(self, device: DeviceLike) -> int:
        wanted = Device.parse(device)
        for dev, nbytes in self.limits:
            if dev == wanted:
                return nbytes
        return 0

    def source_of(self, device: DeviceLike) -> str | None:
        """Where the limit of `device` came from, or None when the budget does not say."""
        wanted = Device.parse(device)
        return next((text for dev, text in self.sources if dev == wanted), None)

    def __iter__(self) -> Iterator[tuple[Device, int]]:
        return iter(self.limits)

    def as_max_memory(self) -> dict[int | str, int]:
        """accelerate's `max_memory` dict form."""
        return {device.key: nbytes for device, nbytes in self.limits}


class ExecutionPolicy(str, enum.Enum):
    """Where a block whose weights sit in CPU RAM runs when a GPU exists. One type everywhere: `plan`,
    `load_checkpoint_and_dispatch`, `from_pretrained`, `attach` and the CLI (`--policy`) accept it or its name.

    STREAM: copy its weights to the GPU for each forward (compute-bound blocks, large batches).
    LOCAL: run it on the CPU and move only the activations (small batches, where the copy dominates).

    A `str` enum, so `ExecutionPolicy.LOCAL == "local"` and it is written to JSON as its name.
    """

    STREAM = "stream"
    LOCAL = "local"

    def __str__(self) -> str:
        return self.value

    @staticmethod
    def parse(value: "ExecutionPolicy | str") -> "ExecutionPolicy":
        """The policy a value or a name ("stream", "local") means.

        Raises:
            PlanError: any other value.

        >>> ExecutionPolicy.parse("local")
        <ExecutionPolicy.LOCAL: 'local'>
        """
        try:
            return ExecutionPolicy(value)
        except ValueError:
            raise PlanError(f"unknown execution policy {value!r}; use 'stream' or 'local'.") from None
