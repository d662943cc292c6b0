"""Quantized weights: int8 per output channel, int4 group-wise, packed while streaming, run by torch's kernels.

A `Quantization` (scheme, int4 group size, modules to skip) is read once from the user's `quantize=` /
`quantize_skip=`. `choose_linears` decides which `nn.Linear` modules of a model are quantized (every one but
the output head, linears whose weight is tied to another tensor, and `skip`), and `swap_linears` replaces
them on the meta model by `QuantLinear`s, whose tensors already have the quantized dtypes and shapes: from
then on the inventory sizes quantized bytes, the planner places them, the store holds them and the runtime
brings them in like any other tensor. The loader quantizes each checkpoint weight with `quantize_weight`,
a few rows at a time, into the tensors the `QuantLinear` holds.

Schemes (w: the float weight [N, K], N outputs, K inputs):
- int8: symmetric per output channel. `weight` int8 [N, K], `weight_scale` [N] in the compute dtype;
  w ~= weight * scale. Same layout on every device.
- int4: asymmetric per group of `group_size` inputs (default 128). `weight` uint8 [N, K/2] (two values per
  byte), `weight_scales_zeros` [K/group, N, 2] (scale, zero) in the compute dtype; w ~= (q - 8) * scale + zero,
  the convention of torch's tinygemm kernels. The byte order of `weight` is the layout of the device that
  runs the block (`Layout`): on the CPU the order `torch.ops.aten._convert_weight_to_int4pack_for_cpu`
  produces, which depends on the CPU's vector width (AVX512, AVX2, none), so it is tagged with it; for CUDA
  plain nibbles (even column in the high nibble) that `_convert_weight_to_int4pack` tiles on the GPU at each
  call (a device-side copy of the packed bytes, cheap next to the matmul).

Compute (chosen by measurement: benchmarks/ANALYSIS.md, "int8 and int4 kernels on the CPU"): on the CPU the
packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) run decode, since decode reads every
weight once and they read 2x / 4x fewer bytes; from `_DEQUANTIZE_ROWS` rows (prefill) int8 converts its weight
to the compute dtype and runs the dense matmul, while int4 keeps the packed kernel (its CPU byte order has no
cheap dequantization). Quantized models should compute in bfloat16 or float16: float32 activations are the
packed kernels' slow path. On CUDA int8 dequantizes on the device (`linear(x, q.to(dtype)) * scale`); int4
runs `_weight_int4pack_mm` in bfloat16 (compute capability 8.0 and newer).

torch's CPU int8 kernel misreads bfloat16 rows whose width is not a multiple of its vector (8 values on AVX2,
16 on AVX512) and activations that start off a 16-byte boundary (crashes and wrong numbers; benchmarks/
ANALYSIS.md, "torch's CPU int8 kernel and input widths"). So an int8 Linear whose input width is not a
multiple of 16 never uses that kernel (`QuantLinear.packed_cpu`, decided when it is swapped and stated in the
plan): it runs the dense matmul; and activations or weights that start misaligned are copied first or
dequantized.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import functools
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bigload.errors import QuantizationError
from bigload.messages import Setting, Text, setting
from bigload.tensors import owner_of, tensor_groups

__all__ = [
    "Layout",
    "QuantLinear",
    "Quantization",
    "Scheme",
    "PackMemo",
    "check_device",
    "choose_linears",
    "cpu_layout",
    "pin_thread_counts",
    "quantize_model",
    "quantize_weight",
    "quantized_linears",
    "swap_linears",
]

# Rows (tokens x batch) from which int8 on the CPU converts its weight and runs the dense matmul (see the
# module docstring: the packed kernel wins up to 16 rows, the two tie at 32, the dense matmul wins beyond).
_DEQUANTIZE_ROWS = 32
# torch's CPU int8 kernel reads a row of activations and of weights 8 (AVX2) or 16 (AVX512) values at a time
# with aligned vector loads and no tail loop (see the module docstring): it is given only rows whose width is
# a multiple of `_INT8_PACKED_WIDTH` (decided once per Linear, `QuantLinear.packed_cpu`), and activations and
# weights whose first byte is aligned as its loads need (checked per call: a view into a larger tensor, or a
# weight at an odd offset of a CPU slot, may not be).
_INT8_PACKED_WIDTH = 16
_INT8_ROWS_ALIGN = 32  # AVX512 loads 16 bfloat16 activations at once
_INT8_WEIGHT_ALIGN = 16  # and 16 int8 weights
# Rows quantized at once while loading: bounds the float32 copy of a weight (4 MiB for K = 4096) and is a
# multiple of the CPU int4 layout's block of 64 output rows, so packing chunks equals packing the whole.
_CHUNK_ROWS = 256
_INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 kernels accept


class Scheme(str, enum.Enum):
    """How a Linear weight is stored."""

    INT8 = "int8"
    INT4 = "int4"


class Layout(str, enum.Enum):
    """Byte order of packed int4 weights: for the CPU kernel, or plain nibbles tiled on the GPU per call.
    int8 has one layout (`ANY`)."""

    ANY = "any"
    CPU = "cpu"
    NIBBLES = "nibbles"


@functools.lru_cache(maxsize=1)
def cpu_layout() -> str:
    """The CPU int4 layout tag: torch's packing order depends on the vector width it dispatches to."""
    return f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"


@dataclass(frozen=True)
class Quantization:
    """What the user asked for: a scheme, the int4 group size, and modules kept unquantized.

    `Quantization.parse("int8")`, `Quantization.parse("int4")` (groups of 128), `Quantization.parse("int4:64")`.
    `skip` names modules (a name or a dotted prefix of one) whose Linears stay unquantized.
    """

    scheme: Scheme
    group_size: int = 128
    skip: tuple[str, ...] = ()

    @staticmethod
    def parse(value: "str | Quantization | None", skip: Iterable[str] | None = None) -> "Quantization | None":
        """Read `quantize=` and `quantize_skip=`; None (or "none") means no quantization.

        Raises:
            QuantizationError: an unknown scheme ("int3"), a group size the kernels do not take or that is
                not a plain number ("int4:48", "int4: 64", "int4:abc", "int4:-64", "int4:"), or `quantize_skip`
                without `quantize`.
        """
        names = tuple(skip or ())
        if isinstance(value, Quantization):
            return Quantization(value.scheme, value.group_size, value.skip + names)
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            if names:
                raise QuantizationError(Text(
                    _skip_setting(names), " was given without ", setting("quantize"), "; add ",
                    setting("quantize", "'int8'"), " or ", setting("quantize", "'int4'"), ", or drop ",
                    setting("quantize_skip"), "."))
            return None
        text = str(value).strip().lower()
        try:
            scheme = Scheme(text.partition(":")[0])
        except ValueError:
            raise QuantizationError(Text(
                setting("quantize", repr(value)), " is not a scheme bigload knows; use ", setting("quantize", "'int8'"),
                " (per-channel), ", setting("quantize", "'int4'"), " (groups of 128) or ",
                setting("quantize", "'int4:GROUP'"), " (GROUP in 32, 64, 128, 256).")) from None
        return Quantization(scheme, _group_size(value, scheme, text), names)

    @property
    def tag(self) -> str:
        """A short name: "int8", "int4:128"."""
        return self.scheme.value if self.scheme is Scheme.INT8 else f"int4:{self.group_size}"

    def skips(self, name: str) -> bool:
        """Whether module `name` is named by `skip` (itself or a parent)."""
        return owner_of(name, set(self.skip)) is not None


def _group_size(value: object, scheme: Scheme, text: str) -> int:
    """The int4 group size written after the colon ("int4:64"), 128 when there is no colon. Anything else after
    a colon (" 64", "abc", "-64", nothing) is refused rather than read as the default."""
    if ":" not in text:
        return 128
    group_text = text.partition(":")[2]
    if scheme is Scheme.INT4 and group_text.isascii() and group_text.isdigit() and int(group_text) in _INT4_GROUPS:
        return int(group_text)
    raise QuantizationError(Text(
        setting("quantize", repr(value)), ": a group size applies to int4 only and must be one of "
        f"{', '.join(map(str, _INT4_GROUPS))}, written right after the colon, e.g. ",
        setting("quantize", "'int4:64'"), "."))


def choose_linears(model: nn.Module, quantization: Quantization) -> tuple[str, ...]:
    """The names of the `nn.Linear` modules to quantize, in registration order.

    Every Linear except: the output head (`model.get_output_embeddings()` in transformers models), Linears
    whose weight is also registered elsewhere (tied to an embedding), and those `quantization.skip` names.

    Raises:
        QuantizationError: a `skip` name that names no module of `model` (with the closest names: a typo
            would otherwise quantize the module meant to stay in float), no Linear is left (a model without
            Linear layers, or all skipped), or a Linear's shape is one the scheme's kernels cannot run (named,
            with the fix).
    """
    _check_skip_names(model, quantization.skip)
    chosen = []
    for name, module in _candidates(model, quantization):
        _check_shape(name, module.out_features, module.in_features, quantization)
        chosen.append(name)
    if not chosen:
        raise QuantizationError(Text(
            setting("quantize", repr(quantization.tag)), f": {type(model).__name__} has no nn.Linear layer to "
            "quantize (outside the output head, tied weights and ", setting("quantize_skip"), "); load it without ",
            setting("quantize"), "."))
    return tuple(chosen)


def _check_skip_names(model: nn.Module, skip: Sequence[str]) -> None:
    """Refuse `skip` entries that name no module (`model.named_modules()`), suggesting the closest names."""
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    known = set(names)
    unknown = [entry for entry in dict.fromkeys(skip) if entry not in known]
    if not unknown:
        return
    hints = []
    for entry in unknown:
        close = difflib.get_close_matches(entry, names, n=3, cutoff=0.6)
        hint = f"closest: {', '.join(map(repr, close))}" if close else "no module has a similar name"
        hints.append(f"{entry!r} ({hint})")
    example = next((name for name, module in model.named_modules() if type(module) is nn.Linear), "")
    raise QuantizationError(Text(
        _skip_setting(unknown), f" names no module of {type(model).__name__}: {'; '.join(hints)}. Give module "
        "names as ", Setting("model.named_modules() lists them", "`bigload plan MODEL` lists them"),
        f", e.g. {example!r}" if example else "", "."))


def _candidates(model: nn.Module, quantization: Quantization) -> list[tuple[str, nn.Linear]]:
    """The plain `nn.Linear`s `quantization` quantizes: not the output head, not tied, not skipped."""
    head = _output_head(model)
    shared = _shared_weights(model)
    return [(name, module) for name, module in model.named_modules()
            if type(module) is nn.Linear and module is not head and not quantization.skips(name)
            and id(module.weight) not in shared]


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


def _shared_weights(model: nn.Module) -> set[int]:
    """Tensors registered under several names (tied): `tensors.tensor_groups`, the one walk."""
    return {id(group.tensor) for group in tensor_groups(model) if len(group.names) > 1}


def _check_shape(name: str, out_features: int, in_features: int, quantization: Quantization) -> None:
    if quantization.scheme is Scheme.INT8:
        return
    group = quantization.group_size
    problems = []
    if in_features % group:
        problems.append(f"its {in_features} inputs are not a multiple of the group size {group}")
    if out_features % 16:
        problems.append(f"its {out_features} outputs are not a multiple of 16 (the int4 kernels' block)")
    if problems:
        smaller = [g for g in _INT4_GROUPS if in_features % g == 0 and g < group]
        fixes: list[str | Setting] = [_skip_setting((name,)), " or ", setting("quantize", "'int8'")]
        if smaller and not out_features % 16:
            fixes[:0] = [setting("quantize", f"'int4:{smaller[-1]}'"), " or "]
        raise QuantizationError(Text(f"cannot quantize {name!r} to {quantization.tag}: {' and '.join(problems)}; "
                                     "use ", *fixes, "."))


def check_device(quantization: Quantization, device: torch.device, where: str = "") -> None:
    """Refuse a scheme `device` cannot run: int4 on CUDA needs tinygemm's kernels, built for compute
    capability 8.0 (Ampere) and newer.

    Raises:
        QuantizationError: naming the device, its capability and the fix.
    """
    if quantization.scheme is not Scheme.INT4 or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise QuantizationError(Text(
            setting("quantize", repr(quantization.tag)), f"{where}: {device} has compute capability {major}.{minor} "
            "and PyTorch's int4 kernels need 8.0 (Ampere) or newer; use ", setting("quantize", "'int8'"),
            ", or run those blocks on the CPU."))


def _skip_setting(names: Sequence[str]) -> Setting:
    return Setting(f"quantize_skip={list(names)!r}", "--quantize-skip " + " ".join(names))


def swap_linears(model: nn.Module, names: Sequence[str], quantization: Quantization,
                 dtypes: Mapping[str, torch.dtype]) -> None:
    """Replace each named `nn.Linear` by a `QuantLinear` on the meta device (no memory).

    Args:
        model: the model (meta or not; the new modules are on meta and are filled by the loader).
        names: from `choose_linears`.
        quantization: the scheme.
        dtypes: module name -> compute dtype of that Linear (scales, zeros and bias are kept in it).
    """
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = parent.get_submodule(child)
        replacement = QuantLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  quantization=quantization, dtype=dtypes[name], device="meta")
        setattr(parent, child, replacement)


def quantize_model(model: nn.Module, quantization: Quantization,
                   dtype_of: "Callable[[str, torch.dtype], torch.dtype]") -> tuple[str, ...]:
    """Decide which Linears of `model` are quantized and swap them (once: a model that already holds
    `QuantLinear`s of this scheme is left as it is).

    Args:
        model: usually on meta, before planning, so the inventory sizes the quantized tensors.
        quantization: the scheme.
        dtype_of: (weight name, its dtype in the model) -> the dtype the float weight would load in; the
            scales, zeros and bias are kept in it.

    Returns:
        The quantized modules' names.

    Raises:
        QuantizationError: as `choose_linears`, or a model quantized before with another scheme.
    """
    existing = quantized_linears(model)
    if existing:
        _check_same_decision(model, quantization, existing)
        return tuple(existing)
    names = choose_linears(model, quantization)
    dtypes = {name: dtype_of(f"{name}.weight", model.get_submodule(name).weight.dtype) for name in names}
    swap_linears(model, names, quantization, dtypes)
    return names


def _check_same_decision(model: nn.Module, quantization: Quantization, existing: Mapping[str, "QuantLinear"]) -> None:
    """A model quantized before is loaded as it is only when `quantization` would quantize exactly the same
    Linears the same way (its scheme, group and `skip`); anything else would be silently ignored.

    Raises:
        QuantizationError: naming what differs and the fix (build the model again).
    """
    schemes = {module.quantization.tag for module in existing.values()}
    if schemes != {quantization.tag}:
        raise QuantizationError(Text(f"the model was quantized with {', '.join(sorted(schemes))} already; build it "
                                     "again (on meta) to load it with ", setting("quantize", repr(quantization.tag)),
                                     "."))
    skipped = [name for name in existing if quantization.skips(name)]
    missed = [name for name, _ in _candidates(model, quantization)]
    if skipped or missed:
        what = (f"{skipped[:3]} are quantized but quantize_skip names them" if skipped
                else f"{missed[:3]} would be quantized now but were left out")
        raise QuantizationError(Text(f"the model was quantized already with another quantize_skip: {what}; build it "
                                     "again (on meta) to load it with ", _skip_setting(quantization.skip), "."))


def quantized_linears(model: nn.Module) -> dict[str, "QuantLinear"]:
    """The model's `QuantLinear` modules by name, in registration order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}


class PackMemo:
    """Quantizes each float weight once although it yields two tensors (codes and scales), loaded as two
    tasks one after the other: keeps the last weight's result. Safe to call from the loader's reader thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, Layout] | None = None
        self._value: dict[str, torch.Tensor] = {}

    def tensor(self, key: str, part: str, weight: "Callable[[], torch.Tensor]", module: "QuantLinear") -> torch.Tensor:
        """Tensor `part` ("weight", "weight_scale", ...) of `module` quantized from the float weight `key`."""
        with self._lock:
            if self._key != (key, module.layout):
                self._value = quantize_weight(weight(), module.quantization, module.compute_dtype, module.layout)
                self._key = (key, module.layout)
            return self._value[part]


class QuantLinear(nn.Module):
    """A Linear layer whose weight is int8 (per output channel) or int4 (group-wise).

    Tensors: `weight` (int8 [N, K] or uint8 [N, K/2]), `weight_scale` [N] (int8) or `weight_scales_zeros`
    [K/group, N, 2] (int4), `bias` [N] when the Linear had one; all parameters without gradients, so the
    loader, planner, store and hooks treat them as ordinary weights. `layout` says in which byte order an int4
    `weight` was packed (set by the loader, which knows the device that runs the block).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, quantization: Quantization,
                 dtype: torch.dtype, device: torch.device | str = "meta") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantization = Quantization(quantization.scheme, quantization.group_size)
        self.scheme, self.group_size, self.compute_dtype = quantization.scheme, quantization.group_size, dtype
        self.layout = Layout.ANY if self.scheme is Scheme.INT8 else Layout.NIBBLES
        # Whether int8 on the CPU may run torch's packed kernel (for few rows) or must always dequantize.
        self.packed_cpu = self.scheme is Scheme.INT8 and in_features % _INT8_PACKED_WIDTH == 0
        for name, (shape, tensor_dtype) in self.shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=tensor_dtype, device=device),
                                                       requires_grad=False))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @property
    def storage_tag(self) -> str:
        """What its stored bytes are: "int8", "int4:128 in cpu-avx2 order", "int4:128 in cuda order"."""
        if self.scheme is Scheme.INT8:
            return self.quantization.tag
        order = cpu_layout() if self.layout is Layout.CPU else "cuda"
        return f"{self.quantization.tag} in {order} order"

    @property
    def bigload_quantized(self) -> dict[str, str]:
        """Its quantized tensors and their scheme, read by the inventory (`TensorEntry.scheme`)."""
        return {name: self.quantization.tag for name in self.shapes()}

    @property
    def bigload_kernel(self) -> str:
        """How it runs where that differs from its scheme's usual kernel, read by the inventory
        (`TensorEntry.kernel`) so the plan says which Linears run how; "" for the usual one."""
        if self.scheme is Scheme.INT8 and not self.packed_cpu:
            return f"dense on the CPU (input width not a multiple of {_INT8_PACKED_WIDTH})"
        return ""

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The quantized tensors (name -> shape, dtype), bias excluded."""
        return quantized_shapes(self.out_features, self.in_features, self.quantization, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.scheme is Scheme.INT8:
            out = _int8_matmul(rows, self.weight, self.weight_scale, self.packed_cpu)
        else:
            out = _int4_matmul(rows, self.weight, self.weight_scales_zeros, self.group_size, self.layout)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme is Scheme.INT4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme.value}{group}")


def quantized_shapes(out_features: int, in_features: int, quantization: Quantization,
                     dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors (name -> shape, dtype) a quantized Linear weight becomes, bias excluded."""
    if quantization.scheme is Scheme.INT8:
        return {"weight": ((out_features, in_features), torch.int8), "weight_scale": ((out_features,), dtype)}
    groups = in_features // quantization.group_size
    return {"weight": ((out_features, in_features // 2), torch.uint8),
            "weight_scales_zeros": ((groups, out_features, 2), dtype)}


def quantize_weight(weight: torch.Tensor, quantization: Quantization, dtype: torch.dtype,
                    layout: Layout) -> dict[str, torch.Tensor]:
    """Quantize one float weight [N, K] into the tensors of `quantized_shapes`, `_CHUNK_ROWS` rows at a time.

    Peak extra memory is the result plus one chunk in float32 (and, for the CPU int4 layout, its int32 codes),
    not a float copy of the whole weight (benchmarks/ANALYSIS.md, "Measurements behind the code"). The result is
    on the CPU.

    Runs on one intra-op thread (`_one_thread`): its steps are short memory-bound passes over one chunk, and
    split over OpenMP threads they spend most of their CPU waiting at barriers.
    """
    with _one_thread():
        return _quantize_chunks(weight, quantization, dtype, layout)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch's CPU ops of the calling thread on one intra-op thread, then restore the count.

    Measured on this project's 2-core VM under other jobs' load (11008 x 4096 bfloat16 weight to int8): 0.05 s
    of CPU on one thread, 0.25-0.98 s on two (OpenMP threads spinning at the barriers of ~350 short parallel
    regions while the other core is taken); a whole 7 GB model's int8 load spent 50-71 s of CPU quantizing.
    With OpenMP the count is per thread, so the caller's compute elsewhere keeps its threads; torch also
    records the last count as the default of threads that have not run a parallel op yet, which is why it is
    restored at once (and why the loader starts its threads' counts before quantizing: `pin_thread_counts`).
    Other backends keep one process-wide pool, which is left alone.
    """
    if not torch.backends.openmp.is_available() or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pin_thread_counts() -> None:
    """Fix the calling thread's intra-op thread count now, if it is not yet: torch sets a thread's count on its
    first parallel op from a process-wide default, which `quantize_weight` lowers for a moment on the thread
    that quantizes. The loader calls it on the caller's thread before its reader thread starts quantizing."""
    torch.get_num_threads()


def _quantize_chunks(weight: torch.Tensor, quantization: Quantization, dtype: torch.dtype,
                     layout: Layout) -> dict[str, torch.Tensor]:
    weight = weight.to("cpu")
    n, k = weight.shape
    out = {name: torch.empty(shape, dtype=tensor_dtype)
           for name, (shape, tensor_dtype) in quantized_shapes(n, k, quantization, dtype).items()}
    # Written in place chunk by chunk (no list of chunks to concatenate: that would hold the result twice).
    scales_name, rows_dim = ("weight_scale", 0) if quantization.scheme is Scheme.INT8 else ("weight_scales_zeros", 1)
    for start in range(0, n, _CHUNK_ROWS):
        count = min(_CHUNK_ROWS, n - start)
        codes, scales = _quantize_rows(weight[start:start + count], quantization, dtype, layout)
        out["weight"][start:start + count] = codes
        out[scales_name].narrow(rows_dim, start, count).copy_(scales)
    return out


def _quantize_rows(rows: torch.Tensor, quantization: Quantization, dtype: torch.dtype,
                   layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    # One float32 copy of the chunk, then in-place steps: the chunk is the only large temporary (a float32
    # `rows` may be a view of the checkpoint, so it is copied, never written).
    w = rows.to(torch.float32, copy=True)
    if quantization.scheme is Scheme.INT8:
        # The scale is rounded to the compute dtype first, so the codes are chosen against the scale used.
        absmax = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_())
        scale = (absmax / 127).clamp_(min=1e-12).to(dtype)
        codes = w.div_(scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return codes, scale
    n, k = w.shape
    grouped = w.view(n, k // quantization.group_size, quantization.group_size)
    low, high = grouped.amin(dim=2), grouped.amax(dim=2)
    scale = ((high - low).clamp_(min=1e-12) / 15).to(dtype)
    zero = (low + scale.float() * 8).to(dtype)  # tinygemm: w = (q - 8) * scale + zero
    base = zero.float() - scale.float() * 8
    codes = grouped.sub_(base[..., None]).div_(scale.float()[..., None]).round_().clamp_(0, 15).view(n, k)
    scales_zeros = torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous()
    return _pack_int4(codes, layout), scales_zeros


def _pack_int4(codes: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Codes 0..15 (float32) -> two per byte, in `layout`'s order."""
    if layout is Layout.CPU:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    small = codes.to(torch.uint8)
    return small[:, ::2] << 4 | small[:, 1::2]


def _int8_matmul(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, packed_cpu: bool) -> torch.Tensor:
    if packed_cpu and rows.device.type == "cpu" and rows.shape[0] < _DEQUANTIZE_ROWS \
            and weight.data_ptr() % _INT8_WEIGHT_ALIGN == 0:
        rows = rows.contiguous()
        if rows.data_ptr() % _INT8_ROWS_ALIGN:
            rows = rows.clone()  # a view starting inside a larger tensor; a new tensor is aligned (a few rows)
        return torch.ops.aten._weight_int8pack_mm(rows, weight, scale.to(rows.dtype))
    # Per-output-channel scales commute with the matmul: scale the N outputs, not the N x K weight.
    return F.linear(rows, weight.to(rows.dtype)) * scale.to(rows.dtype)


def _int4_matmul(rows: torch.Tensor, weight: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                 layout: Layout) -> torch.Tensor:
    if rows.device.type == "cpu":
        if layout is not Layout.CPU:
            raise QuantizationError("an int4 weight packed for CUDA is running on the CPU; load the model again "
                                    "with the CPU as the block's execution device.")
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), weight, group_size,
                                                          scales_zeros.to(rows.dtype))
    if layout is not Layout.NIBBLES:
        raise QuantizationError("an int4 weight packed for the CPU is running on a GPU; load the model again "
                                "with that GPU as the block's execution device.")
    k = weight.shape[1] * 2
    inner = next(tiles for tiles in (8, 4, 2) if k % (tiles * 16) == 0)
    tiled = torch.ops.aten._convert_weight_to_int4pack(weight.contiguous(), inner)
    out = torch.ops.aten._weight_int4pack_mm(rows.to(torch.bfloat16).contiguous(), tiled, group_size,
                                             scales_zeros.to(torch.bfloat16))
    return out.to(rows.dtype)
