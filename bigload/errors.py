"""bigload's exception types.

One base class so callers can catch everything bigload raises on purpose; a few subclasses so they can
tell a plan that does not fit from a malformed checkpoint. Every message names the thing at fault (file,
tensor, module, device) and says what would fix it.

Each type is also the built-in exception accelerate (or torch underneath it) raises in the same situation,
so `except ValueError:` written around accelerate's `load_checkpoint_and_dispatch` keeps working when the
call is bigload's. Where one bigload type covers situations in which accelerate raises two different
built-ins, a subclass adds the second one (and keeps the first):

bigload type (also a)                           where accelerate 1.15 raises that built-in
----------------------------------------------  ------------------------------------------------------------------
BudgetError (ValueError)                        a `max_memory` size does not parse or is negative
PlanError (ValueError)                          `device_map` is an unknown strategy string; a map leaves tensors
                                                unplaced; the model fits only with disk and no offload folder
CheckpointError (ValueError)                    the checkpoint path is no file or folder; a folder holds no
                                                checkpoint, or several indexes
  CheckpointMismatchError (+ RuntimeError)      `strict=True` meets unexpected tensors, or shapes differ:
                                                ValueError with a `device_map`, torch's `load_state_dict`
                                                RuntimeError without one
  CheckpointNotFoundError (+ FileNotFoundError) the path is missing (ValueError); a shard its index names is
                                                missing (FileNotFoundError)
OffloadError (ValueError)                       a map puts tensors on "disk" and no offload folder is given
  OffloadIOError (+ OSError of its errno)       the offload folder cannot be created or written: `os.makedirs`'
                                                FileExistsError, PermissionError, ...
DeviceError (ValueError)                        a `max_memory` key names no device; a map places no module
                                                holding a tensor
  DeviceNotFoundError (+ RuntimeError)          torch is handed a device it does not know ("tpu") or a GPU this
                                                machine does not have
QuantizationError (ValueError)                  no accelerate counterpart: a bad `quantize=` value
DistributedError, AdapterError                  no accelerate counterpart, no built-in base

Where accelerate fails by accident rather than by a check (an `AttributeError` for `dtype="float7"`, an
`IndexError` for a list `max_memory` or a tie it cannot place, torch's `NotImplementedError` when it copies a
meta tensor to disk, `safetensors`' and `pickle`'s own errors for a corrupt file), bigload raises its own type
with the fix and does not imitate the accident. `tests/test_compat_errors.py` runs each situation through
both libraries.
"""

from __future__ import annotations

import errno as errno_codes
import functools

from bigload.messages import Audience, render

__all__ = [
    "AdapterError",
    "BigloadError",
    "BudgetError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "DeviceError",
    "DeviceNotFoundError",
    "DistributedError",
    "OffloadError",
    "OffloadIOError",
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


class PlanError(BigloadError, ValueError):
    """The model does not fit the budgets, or a user device map breaks a constraint."""


class CheckpointError(BigloadError, ValueError):
    """A checkpoint is malformed, incomplete, unsafe, or does not match the model."""


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """The checkpoint's tensors do not match the model's: names (with `strict=True`) or shapes.

    A RuntimeError too, as torch's `load_state_dict` raises for the same mismatch."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file or folder, or a shard its index names, is not there (`errno` is ENOENT)."""

    def __init__(self, message: object) -> None:
        super().__init__(message)
        self.errno = errno_codes.ENOENT


class OffloadError(BigloadError, ValueError):
    """The offload store cannot be written or read, or belongs to another checkpoint or dtype."""


class OffloadIOError(OffloadError, OSError):
    """The filesystem refused a read or write of offloaded weights.

    `errno` is the refusal's, and, as `OSError(errno, ...)` does, the error is also the OSError subclass of that
    errno: `OffloadIOError(message, errno.EEXIST)` is a FileExistsError, `errno.EACCES` a PermissionError, so
    `except FileExistsError:` written for accelerate's `os.makedirs` still catches it.
    """

    def __new__(cls, message: object, errno: int | None = None) -> "OffloadIOError":
        kind = type(OSError(errno, "")) if errno is not None else OSError
        if cls is OffloadIOError and kind is not OSError:
            cls = _offload_io_error_for(kind)
        return OSError.__new__(cls, message)

    def __init__(self, message: object, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __reduce__(self) -> tuple[type, tuple[object, int | None]]:
        return OffloadIOError, (self.args[0], self.errno)


@functools.cache
def _offload_io_error_for(kind: type[OSError]) -> type[OffloadIOError]:
    """OffloadIOError that is also `kind` (FileExistsError, ...): named OffloadIOError, made once per kind."""
    return type("OffloadIOError", (OffloadIOError, kind), {"__module__": __name__, "__qualname__": "OffloadIOError"})


class DeviceError(BigloadError, ValueError):
    """A device setting is malformed, or places no device where one is needed."""


class DeviceNotFoundError(DeviceError, RuntimeError):
    """A device torch cannot use: a name it does not know, or a GPU this machine does not have.

    A RuntimeError too, as torch raises for an unknown device string or a missing GPU."""


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
