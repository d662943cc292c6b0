"""bigload's exception types.

One base class so callers can catch everything bigload raises on purpose; a few subclasses so they can
tell a plan that does not fit from a malformed checkpoint. Every message names the thing at fault (file,
tensor, module, device) and says what would fix it.
"""

from __future__ import annotations

from bigload.messages import Audience, render

__all__ = [
    "AdapterError",
    "BigloadError",
    "BudgetError",
    "CheckpointError",
    "DeviceError",
    "DistributedError",
    "OffloadError",
    "PlanError",
    "QuantizationError",
]


class BigloadError(Exception):
    """Base class of every error bigload raises deliberately.

    The message is a `bigload.messages.Text` where it names a setting: `str(exc)` spells it as Python
    keywords (`offload_folder=`), `exc.render(Audience.CLI)` as the flags a person types
    (`--offload-folder`). The place that shows the error chooses.
    """

    def render(self, audience: Audience = Audience.PYTHON) -> str:
        """The message for `audience` (Python keywords or CLI flags)."""
        if len(self.args) == 1:
            return render(self.args[0], audience)
        return str(self)


class BudgetError(BigloadError, ValueError):
    """A memory size or a `max_memory` entry is malformed (bad unit, negative, unknown device key)."""


class PlanError(BigloadError):
    """The model does not fit the budgets, or a user device map breaks a constraint."""


class CheckpointError(BigloadError):
    """A checkpoint is malformed, incomplete, unsafe, or does not match the model."""


class OffloadError(BigloadError):
    """The offload store cannot be written or read, or belongs to another checkpoint or dtype."""


class DeviceError(BigloadError):
    """A device is unknown, or does not exist on this machine when loading onto it."""


class DistributedError(BigloadError):
    """A pipeline across ranks cannot start or went wrong: ranks given different inputs, a rank that died or
    stopped answering within the timeout, a stage that failed. The message names the rank; `rank` holds it
    when one rank is at fault."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class QuantizationError(BigloadError, ValueError):
    """A `quantize=` scheme bigload does not know, a model or Linear it cannot apply to, or a device that
    cannot run it."""


class AdapterError(BigloadError):
    """An adapter (peft) that cannot go on this model: unreadable, unknown method, or made for another base."""
