"""`bigload.from_pretrained`: a Hugging Face model folder loaded on this machine (`integrations.hf`), or split
over the ranks of `torchrun` (`distributed`). The one entry point that sits above both, so neither imports the
other."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from bigload.distributed import from_pretrained_distributed
from bigload.errors import BigloadError, QuantizationError
from bigload.integrations.hf import from_pretrained as from_pretrained_here

__all__ = ["from_pretrained"]

# transformers' `from_pretrained` keywords a caller brings along, and bigload's way to say the same.
_TRANSFORMERS_KEYWORDS = {
    "load_in_8bit": "quantize='int8' (bigload's own int8; bitsandbytes is not used)",
    "load_in_4bit": "quantize='int4' (bigload's own int4; bitsandbytes is not used)",
    "quantization_config": "quantize='int8' or quantize='int4' (bigload's own schemes)",
}

# Keywords of the one-machine load the pipeline across ranks does not take yet, with what to do instead.
_NOT_DISTRIBUTED = {
    "adapter": "merge the adapter into the base model (peft's merge_and_unload, then save_pretrained) and load that",
    "quantize": "load without quantize=, or on one machine with distributed=False",
    "quantize_skip": "load without quantize_skip=, or on one machine with distributed=False",
    "disk_reads": "leave it unset (each rank decides how its disk blocks come in), or load on one machine with "
                  "distributed=False",
    "materialize": "leave it unset, or load on one machine with distributed=False",
}


def from_pretrained(path: str | Path, *, distributed: bool = False, pipeline: Mapping[str, Any] | None = None,
                    **options: Any) -> nn.Module | None:
    """Load a Hugging Face model folder, ready for `generate`.

    Args:
        path: a folder with config.json and safetensors (or .bin) weights.
        distributed: under `torchrun`, split the model over the ranks (`bigload.distributed`): every rank loads
            only its own blocks; rank 0 gets the model (its `generate` runs the whole pipeline) and the other
            ranks serve their blocks inside this call until rank 0 stops the pipeline
            (`bigload.stop_pipeline(model)`, or at exit), then get None. `max_memory` is each rank's budget;
            `device_map` the strategy inside each rank.
        pipeline: more options of the distributed path (`max_memory_hosts`, `timeout`, `idle_timeout`; see
            `bigload.distributed.from_pretrained_distributed`).
        options: the keywords of `bigload.integrations.hf.from_pretrained` (device_map, max_memory, dtype,
            offload_folder, context_length, batch_size, strict, progress, prefetch, no_split_module_classes,
            materialize, policy, adapter, quantize, quantize_skip, disk_reads, model_class); transformers'
            `torch_dtype=` is read as `dtype=`, and its `load_in_8bit=`/`load_in_4bit=`/`quantization_config=` are
            refused naming `quantize=`.

    Returns:
        The model (peft's `PeftModel` with adapters); None on ranks other than 0 once they stop serving.

    Raises:
        BigloadError subclasses: see `integrations.hf.from_pretrained` and `distributed.from_pretrained_distributed`;
            with `distributed=True`, a keyword the pipeline does not take yet (named, with the fix).

    >>> model = bigload.from_pretrained("Llama-3-8B/", max_memory={"cpu": "8GiB", "disk": "64GiB"},
    ...                                 offload_folder="offload/")  # doctest: +SKIP
    """
    options = _bigload_keywords(options)
    if not distributed:
        if pipeline is not None:
            raise BigloadError("pipeline= holds options of distributed=True; pass distributed=True or drop it.")
        return from_pretrained_here(path, **options)
    for name, fix in _NOT_DISTRIBUTED.items():
        if options.get(name) not in (None, False):
            raise BigloadError(f"{name}= is not supported with distributed=True yet; {fix}.")
    strategy = options.pop("device_map", "auto")
    for name in _NOT_DISTRIBUTED:
        options.pop(name, None)
    return from_pretrained_distributed(path, strategy=strategy, **options, **(pipeline or {}))


def _bigload_keywords(options: dict[str, Any]) -> dict[str, Any]:
    """`torch_dtype=` (transformers' name until 4.56, which transformers 5 still reads) as `dtype=`; transformers'
    quantization keywords refused naming `quantize=` (Python's TypeError would name no fix).

    Raises:
        BigloadError: `torch_dtype=` and `dtype=` both given.
        QuantizationError: a quantization keyword of transformers.
    """
    for name, fix in _TRANSFORMERS_KEYWORDS.items():
        if options.get(name) not in (None, False):
            raise QuantizationError(f"{name}= is transformers' (bitsandbytes) quantization; bigload takes {fix}.")
        options.pop(name, None)
    if "torch_dtype" in options:
        if options.get("dtype") is not None:
            raise BigloadError("torch_dtype= and dtype= are both given; torch_dtype is transformers' older name for "
                               "dtype: pass dtype= only.")
        options["dtype"] = options.pop("torch_dtype")
    return options
