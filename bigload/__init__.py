"""bigload: run models too big for one device.

Build a model with no memory (`init_empty_weights`), plan where each layer goes (`plan`), stream a
checkpoint straight to that place (`load_checkpoint_in_model`), and run it with offload hooks that
prefetch the next blocks (`load_checkpoint_and_dispatch`, `dispatch_model`). `from_pretrained` does it all
for a Hugging Face model folder. The accelerate-named functions take accelerate's keyword arguments.
"""

from bigload.formats.checkpoint import CheckpointIndex, TensorRef, open_checkpoint
from bigload.integrations.device_maps import compute_module_sizes, find_tied_parameters, get_balanced_memory, infer_auto_device_map
from bigload.devices import Budget, Device, ExecutionPolicy
from bigload.integrations.dispatch import (
    cpu_offload,
    detach,
    disk_offload,
    dispatch_model,
    load_checkpoint_and_dispatch,
    plan_for_model,
    remove_hook_from_submodules,
)
from bigload.distributed import stop_pipeline
from bigload.empty import init_empty_weights, init_on_device
from bigload.errors import (
    AdapterError,
    BigloadError,
    BudgetError,
    CheckpointError,
    DeviceError,
    DistributedError,
    OffloadError,
    PlanError,
    QuantizationError,
)
from bigload.integrations.hf import from_pretrained, load_tokenizer, plan_model
from bigload.plan.inventory import Inventory, inventory_from_checkpoint, inventory_from_module
from bigload.plan.planner import Plan, PlanOptions
from bigload.quant import Quantization
from bigload.load.store import DiskStore
from bigload.load.stream import LoadResult, load_checkpoint_in_model

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "BigloadError",
    "Budget",
    "BudgetError",
    "CheckpointError",
    "CheckpointIndex",
    "Device",
    "DeviceError",
    "DiskStore",
    "DistributedError",
    "ExecutionPolicy",
    "Inventory",
    "LoadResult",
    "OffloadError",
    "Plan",
    "PlanError",
    "PlanOptions",
    "Quantization",
    "QuantizationError",
    "TensorRef",
    "compute_module_sizes",
    "cpu_offload",
    "detach",
    "disk_offload",
    "dispatch_model",
    "find_tied_parameters",
    "from_pretrained",
    "get_balanced_memory",
    "infer_auto_device_map",
    "init_empty_weights",
    "init_on_device",
    "inventory_from_checkpoint",
    "inventory_from_module",
    "load_checkpoint_and_dispatch",
    "load_checkpoint_in_model",
    "load_tokenizer",
    "open_checkpoint",
    "plan_for_model",
    "plan_model",
    "remove_hook_from_submodules",
    "stop_pipeline",
]
