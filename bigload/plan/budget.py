"""What a machine has: device budgets from probing or from a user's `max_memory`.

This is the only planning module that probes: free GPU memory (`torch.cuda.mem_get_info`, which allocates
nothing), available CPU memory (psutil, bounded by the process's memory cgroup), free disk space where
offloaded weights will go. The planner receives the resulting `devices.Budget`, whose `sources` say where
each figure came from, and never probes itself.

In a container (Docker, Kubernetes, Slurm) psutil reports the host's memory, not what the process may use:
the memory cgroup's limit binds first. `cgroup_memory_limit` reads it (cgroup v2 `memory.max` /
`memory.current`, v1 `memory.limit_in_bytes` / `memory.usage_in_bytes`) for the process's cgroup and each
ancestor up to the hierarchy's root, and keeps the one with the least room.

A `max_memory` may name GPUs this machine does not have, or more CPU memory than this container allows:
planning for another machine is the point of a dry run. Loading is checked: onto a missing GPU by
`check_devices_exist`, and with a CPU budget above the room the memory cgroup leaves by `check_cgroup_room`,
which refuses (it does not clamp) before anything is read.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import psutil
import torch

from bigload.devices import CPU, DISK, Budget, Device, DeviceLike
from bigload.errors import BudgetError, DeviceError, DeviceNotFoundError
from bigload.messages import Setting, Text, setting
from bigload.sizes import format_size, parse_size

__all__ = [
    "CgroupLimit",
    "cgroup_memory_limit",
    "check_cgroup_room",
    "check_devices_exist",
    "cpu_available_memory",
    "cpu_memory_budget",
    "detect_budget",
    "disk_free_space",
    "gpu_free_memory",
    "parse_max_memory",
]

MaxMemory = Mapping[int | str, int | float | str]

logger = logging.getLogger(__name__)


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
    return Budget(tuple(sorted(limits.items())), tuple((device, "max_memory") for device in sorted(limits)))


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
            and the CPU (`cpu_memory_budget`: psutil's available memory, bounded by the memory cgroup).
        offload_folder: where disk-offloaded weights will be written; when given and `max_memory` has no
            "disk" entry, the disk budget is that folder's free space.

    Returns:
        A `Budget` whose `sources` say where each device's figure came from.

    Raises:
        BudgetError, DeviceError: as `parse_max_memory`.

    >>> detect_budget({0: "80GiB", "cpu": "512GiB"}, offload_folder="/tmp/offload").devices  # doctest: +SKIP
    (Device(kind=<DeviceKind.GPU: 0>, index=0), Device(kind=<DeviceKind.CPU: 1>, index=0), ...DISK...)
    """
    if max_memory is not None:
        given = parse_max_memory(max_memory)
        limits, sources = dict(given.limits), dict(given.sources)
    else:
        limits = {Device.parse(index): free for index, free in gpu_free_memory().items()}
        sources = {device: "free memory (torch.cuda.mem_get_info)" for device in limits}
        limits[CPU], sources[CPU] = cpu_memory_budget()
    if offload_folder is not None and DISK not in limits:
        limits[DISK] = disk_free_space(offload_folder)
        sources[DISK] = f"free space where {offload_folder} is"
    return Budget(tuple(sorted(limits.items())), tuple(sorted(sources.items())))


def gpu_free_memory() -> dict[int, int]:
    """Free bytes on each visible CUDA device; empty without CUDA.

    Read from NVML where it can be, since asking CUDA (`torch.cuda.mem_get_info`) creates a context, a few
    hundred MiB, on every device asked, for the life of the process. Memory this process's caching allocator
    holds but no tensor uses counts as free: the model's tensors will reuse it.
    """
    if not torch.cuda.is_available():
        return {}
    count = torch.cuda.device_count()
    free = _nvml_free_memory(count)
    if free is None:
        free = {index: torch.cuda.mem_get_info(index)[0] for index in range(count)}
    return {index: free[index] + _cached_unused(index) for index in range(count)}


def _cached_unused(index: int) -> int:
    """Bytes the caching allocator reserved on GPU `index` that no tensor uses (0 before CUDA is in use)."""
    if not torch.cuda.is_initialized():
        return 0
    return max(0, torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml_free_memory(count: int) -> dict[int, int] | None:
    """Free bytes per CUDA index from NVML (no CUDA context), or None where NVML cannot say (no library,
    MIG instances, a CUDA_VISIBLE_DEVICES NVML cannot map)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        free: dict[int, int] = {}
        for index in range(count):
            handle, memory = ctypes.c_void_p(), _NvmlMemory()
            nvml_index = torch.cuda._get_nvml_device_index(index)  # honours CUDA_VISIBLE_DEVICES
            if nvml.nvmlDeviceGetHandleByIndex_v2(nvml_index, ctypes.byref(handle)) != 0:
                return None
            if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
                return None
            free[index] = int(memory.free)
        return free
    except (OSError, AttributeError, RuntimeError, ValueError) as error:
        logger.debug("bigload: NVML cannot report free GPU memory (%s); asking CUDA", error)
        return None


def cpu_available_memory() -> int:
    """Bytes of RAM available to new allocations without swapping (psutil's `available`, host-wide)."""
    return int(psutil.virtual_memory().available)


def cpu_memory_budget(proc: str | os.PathLike[str] = "/proc/self") -> tuple[int, str]:
    """Bytes of CPU memory this process may still use, and a sentence saying where the figure came from.

    The smaller of psutil's available memory and the room left under the process's memory cgroup
    (`cgroup_memory_limit`); a machine without cgroups, or with no limit set, gets psutil's figure.

    >>> cpu_memory_budget()  # inside a 3 GiB container  # doctest: +SKIP
    (3121741824, 'cgroup v1 limit 3.00 GiB at /sys/fs/cgroup/memory/job, 120.0 MiB in use (host available 22.8 GiB)')
    """
    host = cpu_available_memory()
    limit = cgroup_memory_limit(proc)
    if limit is None or limit.available >= host:
        reason = "psutil available memory"
        if limit is not None:
            reason += f" (below the cgroup v{limit.version} limit {format_size(limit.limit)} at {limit.path})"
        return host, reason
    return limit.available, (
        f"cgroup v{limit.version} limit {format_size(limit.limit)} at {limit.path}, "
        f"{format_size(limit.usage - limit.reclaimable)} in use (host available {format_size(host)})"
    )


@dataclass(frozen=True)
class CgroupLimit:
    """The memory limit that binds a process: one cgroup folder's limit and what is charged to it.

    `reclaimable` is the inactive page cache charged to the cgroup: the kernel drops it before it refuses an
    allocation, so, like psutil's `available` and the kubelet's working set, it does not count as used
    (else a checkpoint read once would shrink the next plan's budget).
    """

    version: int
    path: Path
    limit: int
    usage: int
    reclaimable: int

    @property
    def in_use(self) -> int:
        """Bytes charged to the cgroup that the kernel cannot drop (usage less reclaimable page cache)."""
        return max(0, self.usage - self.reclaimable)

    @property
    def available(self) -> int:
        """Bytes the process may still allocate under this limit."""
        return max(0, self.limit - self.in_use)


# cgroup v1 writes "no limit" as the largest page-aligned counter (9223372036854771712); v2 writes "max".
_UNLIMITED = 2**62
_FILES = {  # version -> (limit file, usage file, memory.stat key of reclaimable page cache)
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    2: ("memory.max", "memory.current", "inactive_file"),
}


def cgroup_memory_limit(proc: str | os.PathLike[str] = "/proc/self") -> CgroupLimit | None:
    """The memory cgroup limit with the least room among the process's cgroup and its ancestors.

    Args:
        proc: the `/proc/<pid>` folder whose `cgroup` and `mountinfo` files are read (tests pass fake trees).

    Returns:
        The binding `CgroupLimit`, or None when no memory cgroup is mounted, visible or limited. The v1
        memory controller wins when both hierarchies are mounted: the kernel attaches a controller to one.
    """
    groups = _process_cgroups(Path(proc) / "cgroup")
    for version in (1, 2):
        folders = _cgroup_folders(Path(proc) / "mountinfo", version, groups.get(version))
        if folders is not None:
            limits = [limit for limit in (_read_cgroup(folder, version) for folder in folders) if limit]
            return min(limits, key=lambda limit: limit.available, default=None)
    return None


def _process_cgroups(path: Path) -> dict[int, str]:
    """The process's memory cgroup path in each hierarchy: {1: v1 memory path, 2: unified path}."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    groups: dict[int, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            groups[2] = parts[2]
        elif "memory" in parts[1].split(","):
            groups[1] = parts[2]
    return groups


def _cgroup_folders(mountinfo: Path, version: int, group: str | None) -> list[Path] | None:
    """The folders of `group` and its ancestors (innermost first) under the hierarchy's mount, or None.

    A mount's root may itself be a cgroup (a container sees its own cgroup as `/`), so the process's path is
    taken relative to that root.
    """
    if group is None:
        return None
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields, _, tail = line.partition(" - ")
        fields_list, tail_list = fields.split(), tail.split()
        if len(fields_list) < 5 or len(tail_list) < 3:
            continue
        fstype, options = tail_list[0], tail_list[2].split(",")
        if (version == 1 and fstype == "cgroup" and "memory" in options) or (version == 2 and fstype == "cgroup2"):
            return _ancestors(Path(fields_list[4]), fields_list[3], group)
    return None


def _ancestors(mount: Path, root: str, group: str) -> list[Path]:
    relative = os.path.relpath(group, root) if (group + "/").startswith(root.rstrip("/") + "/") else "."
    parts = [] if relative == "." else Path(relative).parts
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read_cgroup(folder: Path, version: int) -> CgroupLimit | None:
    """One cgroup folder's limit, or None when it has none (or the controller is not enabled there)."""
    limit_file, usage_file, stat_key = _FILES[version]
    try:
        limit_text = (folder / limit_file).read_text().strip()
        usage = int((folder / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= _UNLIMITED:
        return None
    return CgroupLimit(version, folder, int(limit_text), usage, _stat_value(folder / "memory.stat", stat_key))


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def check_cgroup_room(given: Budget, proc: str | os.PathLike[str] = "/proc/self") -> None:
    """Refuse a CPU budget the user gave (`max_memory`) that is larger than the room this process's memory
    cgroup leaves (`cgroup_memory_limit`: its limit minus what is in use, reclaimable page cache excepted).

    The planner takes a given budget as true: it would place that much in CPU memory, and the kernel would
    then kill the process (OOM) or, for memory-mapped weights, evict and re-read them for minutes. The budget
    is refused rather than clamped: a smaller budget means another plan (more on disk), which should be the
    user's choice, made by changing the figure or by leaving "cpu" out to plan with what the container leaves.
    Only loads are checked; a dry run may plan for another machine.

    Args:
        given: the user's budget (`parse_max_memory`); GPU and disk entries are not looked at.
        proc: the `/proc/<pid>` folder whose cgroup is read (tests pass fake trees).

    Raises:
        BudgetError: naming the budget, the cgroup, its limit, what is in use, the room left and the fix.
    """
    asked = given.get(CPU)
    limit = cgroup_memory_limit(proc) if asked else None
    if limit is None or asked <= limit.available:
        return
    room = f"{limit.available // 2**20}MiB"
    raise BudgetError(Text(
        Setting(f"max_memory['cpu'] ({format_size(asked)})", f"--max-memory cpu={format_size(asked).replace(' ', '')}"),
        f" is more than this process may use: its memory cgroup (v{limit.version}, {limit.path}) is limited to "
        f"{format_size(limit.limit)}, {format_size(limit.in_use)} of it in use, which leaves "
        f"{format_size(limit.available)}. A plan for more ends in an OOM kill, or in minutes of re-reading weights "
        "the kernel evicts. Give at most that, e.g. ",
        Setting(f"max_memory={{..., 'cpu': '{room}'}}", f"--max-memory cpu={room},..."),
        " with the rest on disk, or leave cpu out of ", setting("max_memory"), " to plan with what the container "
        "leaves."))


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
        DeviceNotFoundError: a GPU index at or beyond `torch.cuda.device_count()`, or a value that is no device.

    >>> check_devices_exist([0, "cpu"])  # on a machine without CUDA  # doctest: +SKIP
    DeviceNotFoundError: cuda:0 does not exist on this machine (0 CUDA devices visible); ...
    """
    wanted = devices.devices if isinstance(devices, Budget) else tuple(Device.parse(d) for d in devices)
    gpus = sorted({device.index for device in wanted if device.is_gpu})
    if not gpus:
        return
    available = gpu_count if gpu_count is not None else (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    missing = [index for index in gpus if index >= available]
    if missing:
        names = ", ".join(f"cuda:{index}" for index in missing)
        raise DeviceNotFoundError(
            Text(f"{names} does not exist on this machine ({available} CUDA device(s) visible). Plan again for "
                 "this machine (", setting("max_memory"), " with existing GPUs only), or map those modules to "
                 "'cpu' or 'disk'.")
        )
