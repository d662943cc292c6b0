"""bigload: run models too big for one device.

Build a model with no memory (`init_empty_weights`), plan where each layer goes (`plan`), stream a
checkpoint straight to that place (`load_checkpoint_in_model`), and run it with offload hooks.
"""

from bigload.devices import Budget, Device
from bigload.empty import init_empty_weights, init_on_device
from bigload.errors import (
    BigloadError,
    BudgetError,
    CheckpointError,
    DeviceError,
    OffloadError,
    PlanError,
)

__version__ = "0.1.0"

__all__ = [
    "BigloadError",
    "Budget",
    "BudgetError",
    "CheckpointError",
    "Device",
    "DeviceError",
    "OffloadError",
    "PlanError",
    "init_empty_weights",
    "init_on_device",
]
