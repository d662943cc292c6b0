"""Planning settings, gathered once at an entry point, and the two rules they feed: where CPU-resident blocks
run when a GPU exists (`choose_policy`, a bandwidth model), and what each device keeps free (headroom)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from bigload.devices import CPU, Device, DeviceLike, ExecutionPolicy
from bigload.errors import PlanError
from bigload.messages import Text, setting
from bigload.plan.reserve import DiskReads
from bigload.sizes import format_size, parse_dtype, parse_size

__all__ = [
    "CPU_FLOPS",
    "CPU_MEMORY_BYTES_PER_S",
    "DEFAULT_GPU_HEADROOM_FRACTION",
    "DEFAULT_GPU_HEADROOM_MIN",
    "PCIE_BYTES_PER_S",
    "STRATEGIES",
    "PlanOptions",
    "choose_policy",
    "default_gpu_headroom",
    "fixed_headroom",
    "headroom_reason",
]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

# The bandwidth model behind the default execution policy (round figures for a PCIe 4 x16 host and a
# server CPU running bf16 GEMV/GEMM; they only need to be right within a factor of two or so).
PCIE_BYTES_PER_S = 25e9
CPU_MEMORY_BYTES_PER_S = 50e9
CPU_FLOPS = 0.5e12

# What a GPU needs beyond weights, KV cache and the offload reserve, and no planner can size: CUDA context
# and cuBLAS/attention workspaces (loaded lazily, at the first matmul), activations of a prefill, and the
# caching allocator's rounding. Kept free on every GPU unless the caller gives `headroom=`.
DEFAULT_GPU_HEADROOM_MIN = 1 << 30
DEFAULT_GPU_HEADROOM_FRACTION = 0.05


@dataclass(frozen=True)
class PlanOptions:
    """Every planning setting, gathered once at an entry point (`plan_for_model`, `plan_model`,
    `load_checkpoint_and_dispatch`, `dispatch_model`, `from_pretrained`, the CLI) from accelerate-style
    keywords, then passed down as one value (as `torch.distributed.checkpoint` passes one planner object).

    Attributes:
        strategy: "auto", "balanced", "balanced_low_0" or "sequential" (see `bigload.plan.planner`); not
            read for a map the caller gives.
        dtype: the dtype floating weights are loaded in (None: the model's); sizes the KV cache too.
        max_memory: per-device budgets in accelerate's format (`{0: "20GiB", "cpu": "60GiB"}`); None: what
            the machine has free (probed by `budget.detect_budget` at the entry point, never here).
        offload_folder: with no "disk" budget, its free space becomes the disk budget.
        headroom: bytes kept free on each device that runs blocks (an int or size string applies to every
            GPU, and to the CPU when it runs blocks), or a per-device mapping. None: each GPU keeps
            `default_gpu_headroom(budget)` free (max(1 GiB, 5 %)); pass 0 to plan GPUs full.
        context_length: tokens per sequence to keep KV cache for, charged to the device running each
            attention layer (needs a KV-cache spec in the inventory).
        batch_size: sequences decoded at once (KV cache size, and the execution-policy model).
        prefetch: offloaded blocks loaded ahead of the running one; the reserve covers them.
        policy: an `ExecutionPolicy` (names are parsed) for CPU-resident blocks when a GPU exists; None:
            `choose_policy` decides (for a map the caller gives: `STREAM`, accelerate's behaviour).
        disk_reads: how disk blocks are brought in (`reserve.DiskReads`: "mapped" in place from the page
            cache, or "read" explicitly into the slots); None: `reserve.choose_disk_reads` decides from the
            CPU memory the plan leaves.
        offload_buffers: offload the buffers of offloaded blocks with them (accelerate's `offload_buffers`);
            otherwise they stay resident on the device the block runs on.
        main_device: where offloaded blocks of a given map run (accelerate's `main_device`); None: the map's
            first GPU, else the CPU. A strategy plans on the budget's first GPU.
        keep_in_fp32_modules, special_dtypes, no_split_module_classes: how the inventory is built (see
            `inventory.DtypeRule`); None: the model's own lists.
    """

    strategy: str = "auto"
    dtype: torch.dtype | None = None
    max_memory: Mapping[int | str, int | str] | None = None
    offload_folder: Any = None
    headroom: int | str | Mapping[DeviceLike, int | str] | None = None
    context_length: int | None = None
    batch_size: int = 1
    prefetch: int = 1
    policy: ExecutionPolicy | None = None
    disk_reads: DiskReads | None = None
    offload_buffers: bool = False
    main_device: Device | None = None
    keep_in_fp32_modules: tuple[str, ...] | None = None
    special_dtypes: Mapping[str, torch.dtype] | None = None
    no_split_module_classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Normalized once, here, so every reader sees parsed values (names -> dtypes, policies, devices).
        set_ = functools.partial(object.__setattr__, self)
        if self.dtype is not None:
            set_("dtype", parse_dtype(self.dtype))
        if self.policy is not None:
            set_("policy", ExecutionPolicy.parse(self.policy))
        if self.disk_reads is not None:
            set_("disk_reads", DiskReads.parse(self.disk_reads))
        if self.main_device is not None:
            set_("main_device", Device.parse(self.main_device))
        if self.special_dtypes is not None:
            set_("special_dtypes", {name: parse_dtype(v) for name, v in self.special_dtypes.items()})
        for name in ("keep_in_fp32_modules", "no_split_module_classes"):
            value = getattr(self, name)
            if value is not None:
                set_(name, (value,) if isinstance(value, str) else tuple(value))
        self._check()

    def _check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise PlanError(f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}.")
        if self.prefetch < 0:
            raise PlanError(Text(setting("prefetch", str(self.prefetch)),
                                 " is negative; use 0 (load on demand) or a positive depth."))
        if self.batch_size < 1:
            raise PlanError(Text(setting("batch_size", str(self.batch_size)), " must be at least 1."))
        if self.context_length is not None and self.context_length < 0:
            raise PlanError(Text(setting("context_length", str(self.context_length)), " is negative."))
        if self.main_device is not None and not (self.main_device.is_gpu or self.main_device == CPU):
            raise PlanError("the main execution device cannot be 'disk'; use a GPU index or 'cpu'.")

    def with_settings(self, **settings: Any) -> "PlanOptions":
        """A copy with some settings changed.

        Raises:
            TypeError: a name that is no planning setting.
        """
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown planning setting(s) {unknown}; see bigload.plan.PlanOptions.")
        return dataclasses.replace(self, **settings)


# --------------------------------------------------------------------------------------------------
# Where CPU-resident blocks run


# "pass policy= to override" in Python, "pass --policy local|stream to override" on the command line.
_POLICY_OVERRIDE = setting("policy", "", "local|stream")


def choose_policy(batch_size: int, width: int) -> tuple[str, str]:
    """Where CPU-resident blocks should run when a GPU exists, by a bandwidth model of one decode step.

    Streaming moves every weight byte over PCIe (`PCIE_BYTES_PER_S`). Running locally reads every weight
    byte from RAM (`CPU_MEMORY_BYTES_PER_S`) and does `2 x batch_size` flops per parameter on the CPU
    (`CPU_FLOPS`); activations crossing the bus are a few KB per token either way and are ignored. The
    cheaper time per weight byte wins: small batches run locally, large batches stream.

    Args:
        batch_size: tokens per forward during decoding.
        width: bytes per weight element.

    Returns:
        ("stream" or "local", a one-line reason).

    >>> choose_policy(1, 2)[0]
    'local'
    >>> choose_policy(64, 2)[0]
    'stream'
    """
    stream = 1 / PCIE_BYTES_PER_S
    local = max(1 / CPU_MEMORY_BYTES_PER_S, 2 * batch_size / width / CPU_FLOPS)
    choice = "local" if local < stream else "stream"
    reason = Text(f"CPU-resident blocks {'run on the CPU' if choice == 'local' else 'stream their weights to the GPU'}"
                  f" ('{choice}'): per weight byte and decode step, streaming costs {stream * 1e12:.0f} ps over "
                  f"PCIe, running locally {local * 1e12:.0f} ps (batch {batch_size}); pass ",
                  _POLICY_OVERRIDE, " to override.")
    return choice, reason


# --------------------------------------------------------------------------------------------------
# Headroom


def default_gpu_headroom(budget: int) -> int:
    """Bytes a GPU with `budget` bytes keeps free by default: max(1 GiB, 5 % of the budget), at most the budget.

    >>> default_gpu_headroom(24 * 2**30) / 2**30
    1.2
    """
    return min(budget, max(DEFAULT_GPU_HEADROOM_MIN, int(budget * DEFAULT_GPU_HEADROOM_FRACTION)))


def fixed_headroom(headroom: int | str | Mapping[DeviceLike, int | str] | None,
                   devices: Sequence[tuple[Device, int]], cpu_runs: bool, cast_bytes: int) -> dict[Device, int]:
    """Bytes each device keeps free beyond weights, KV cache and reserve: `headroom` as given (or the GPU
    default), and on every GPU at least `cast_bytes`, the largest tensor that lands there in its stored dtype
    before it is cast (`Inventory.cast_bytes`).

    Raises:
        PlanError: a per-device headroom names a device that has no budget.
        BudgetError: a size that cannot be read.
    """
    known = {device for device, _ in devices}
    if headroom is None:
        fixed = {device: default_gpu_headroom(nbytes) for device, nbytes in devices if device.is_gpu}
    elif isinstance(headroom, Mapping):
        fixed = {}
        for key, value in headroom.items():
            device = Device.parse(key)
            if device not in known:
                raise PlanError(f"headroom names {device}, which has no budget; give headroom only for devices "
                                f"in max_memory ({', '.join(str(d) for d in sorted(known))}).")
            fixed[device] = parse_size(value, what=f"headroom[{key!r}]")
    else:
        amount = parse_size(headroom, what="headroom")
        fixed = {device: amount for device in known if device.is_gpu or (device == CPU and cpu_runs)}
    for device in known:
        if device.is_gpu:
            fixed[device] = max(fixed.get(device, 0), cast_bytes)
    return fixed


def headroom_reason(headroom: object, fixed: Mapping[Device, int], cast_bytes: int) -> str:
    """Why each GPU keeps what it keeps free (a `why:` line of `explain()`)."""
    gpus = ", ".join(f"{device} {format_size(nbytes)}" for device, nbytes in sorted(fixed.items()) if device.is_gpu)
    why = ("default max(1 GiB, 5 % of its budget) for CUDA/cuBLAS workspaces, activations and allocator rounding"
           if headroom is None else "as given by headroom=")
    cast = (f"; at least the largest cast while loading ({format_size(cast_bytes)}: a tensor lands in its stored "
            "dtype before it is cast)" if cast_bytes else "")
    return f"each GPU keeps memory free beyond weights, KV cache and reserve ({gpus}): {why}{cast}; pass headroom= " \
           "to change it."
