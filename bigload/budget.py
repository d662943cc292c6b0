"""What a machine has: device budgets from probing or from a user's `max_memory`.

This is the only planning module that probes: free GPU memory (`torch.cuda.mem_get_info`, which allocates
nothing), available CPU memory (psutil), free disk space where offloaded weights will go. The planner
receives the resulting `devices.Budget` and never probes itself.

A `max_memory` may name GPUs this machine does not have: planning for another machine is the point of a
dry run. Loading onto such a device is refused by `check_devices_exist`, which the loader calls.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import psutil
import torch

from bigload.devices import DISK, Budget, Device, DeviceLike
from bigload.errors import BudgetError, DeviceError
from bigload.messages import Setting, Text, setting
from bigload.sizes import parse_size

__all__ = [
    "check_devices_exist",
    "cpu_available_memory",
    "detect_budget",
    "disk_free_space",
    "gpu_free_memory",
    "parse_max_memory",
]

MaxMemory = Mapping[int | str, int | float | str]


def parse_max_memory(max_memory: MaxMemory) -> Budget:
    """Validate a user `max_memory` dict and turn it into a `Budget`.

    Args:
        max_memory: keys are GPU indices (0, "0", "cuda:1"), "cpu" or "disk"; values are bytes (int) or
            sizes such as "24GiB" (binary) or "24GB" (decimal).

    Returns:
        A `Budget`, devices in placement order.

    Raises:
        BudgetError: not a mapping, empty, a value that is not a size (bad unit, negative), or two keys
            naming one device (0 and "cuda:0").
        DeviceError: a key that names no device ("mps", "gpu0", -1).

    >>> parse_max_memory({0: "24GiB", "cpu": "64GB"}).as_max_memory()
    {0: 25769803776, 'cpu': 64000000000}
    """
    if not isinstance(max_memory, Mapping):
        raise BudgetError(
            f"max_memory must be a dict such as {{0: '24GiB', 'cpu': '64GiB'}}, not {type(max_memory).__name__}."
        )
    if not max_memory:
        raise BudgetError("max_memory is empty; give at least one device, e.g. {0: '24GiB', 'cpu': '64GiB'}.")
    limits: dict[Device, int] = {}
    first_key: dict[Device, object] = {}
    for key, value in max_memory.items():
        device = _parse_key(key)
        if device in limits:
            raise BudgetError(
                Text(setting("max_memory"), f" names {device} twice ({first_key[device]!r} and {key!r}); keep one of them.")
            )
        limits[device] = parse_size(value, what=Text(Setting(f"max_memory[{key!r}]", f"--max-memory {key}=")))
        first_key[device] = key
    return Budget(tuple(sorted(limits.items())))


def _parse_key(key: object) -> Device:
    try:
        return Device.parse(key)  # type: ignore[arg-type]
    except DeviceError:
        raise DeviceError(Text(
            setting("max_memory"), f" key {key!r} names no device; use a GPU index (0, 1, ...), 'cuda:N', 'cpu' "
            "or 'disk'."
        )) from None


def detect_budget(
    max_memory: MaxMemory | None = None,
    *,
    offload_folder: str | os.PathLike[str] | None = None,
) -> Budget:
    """The budget to plan with: the user's `max_memory`, or what this machine has free now.

    Args:
        max_memory: the user's budgets (see `parse_max_memory`); None probes every visible GPU (free memory)
            and the CPU (available memory).
        offload_folder: where disk-offloaded weights will be written; when given and `max_memory` has no
            "disk" entry, the disk budget is that folder's free space.

    Returns:
        A `Budget`.

    Raises:
        BudgetError, DeviceError: as `parse_max_memory`.

    >>> detect_budget({0: "80GiB", "cpu": "512GiB"}, offload_folder="/tmp/offload").devices  # doctest: +SKIP
    (Device(kind=<DeviceKind.GPU: 0>, index=0), Device(kind=<DeviceKind.CPU: 1>, index=0), ...DISK...)
    """
    if max_memory is not None:
        limits = dict(parse_max_memory(max_memory).limits)
    else:
        limits = {Device.parse(index): free for index, free in gpu_free_memory().items()}
        limits[Device.parse("cpu")] = cpu_available_memory()
    if offload_folder is not None and DISK not in limits:
        limits[DISK] = disk_free_space(offload_folder)
    return Budget(tuple(sorted(limits.items())))


def gpu_free_memory() -> dict[int, int]:
    """Free bytes on each visible CUDA device (`torch.cuda.mem_get_info`); empty without CUDA."""
    if not torch.cuda.is_available():
        return {}
    return {index: torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())}


def cpu_available_memory() -> int:
    """Bytes of RAM available to new allocations without swapping (psutil's `available`)."""
    return int(psutil.virtual_memory().available)


def disk_free_space(folder: str | os.PathLike[str]) -> int:
    """Free bytes on the file system that holds `folder` (or would hold it: the folder need not exist yet).

    Raises:
        BudgetError: no parent of `folder` exists or can be read.
    """
    path = Path(folder).expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return int(shutil.disk_usage(candidate).free)
            except OSError as error:
                raise BudgetError(f"cannot read the free space of {candidate} (offload folder {path}): {error}.")
    raise BudgetError(f"no parent of the offload folder {path} exists; create it or choose another folder.")


def check_devices_exist(devices: Budget | Iterable[DeviceLike], *, gpu_count: int | None = None) -> None:
    """Refuse GPUs this machine does not have, before anything is loaded onto them. The one such check:
    planning with `max_memory`, `validate_device_map` and the loader all call it.

    Args:
        devices: a `Budget`, or device-map values (GPU indices, "cuda:N", "cpu", "disk", `Device`s).
        gpu_count: GPUs to check against; default: `torch.cuda.device_count()`.

    Raises:
        DeviceError: a GPU index at or beyond `torch.cuda.device_count()`, or a value that is no device.

    >>> check_devices_exist([0, "cpu"])  # on a machine without CUDA  # doctest: +SKIP
    DeviceError: cuda:0 does not exist on this machine (0 CUDA devices visible); ...
    """
    wanted = devices.devices if isinstance(devices, Budget) else tuple(Device.parse(d) for d in devices)
    gpus = sorted({device.index for device in wanted if device.is_gpu})
    if not gpus:
        return
    available = gpu_count if gpu_count is not None else (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    missing = [index for index in gpus if index >= available]
    if missing:
        names = ", ".join(f"cuda:{index}" for index in missing)
        raise DeviceError(
            Text(f"{names} does not exist on this machine ({available} CUDA device(s) visible). Plan again for "
                 "this machine (", setting("max_memory"), " with existing GPUs only), or map those modules to "
                 "'cpu' or 'disk'.")
        )
