"""bigload's errors are the built-in exceptions accelerate raises, run side by side with accelerate 1.15.

For each bad input that accelerate's loading and dispatching names refuse, both libraries get the same input:
bigload's exception must be an instance of the built-in class accelerate raised (what `except ValueError:` or
`except RuntimeError:` around accelerate's call catches) and of the bigload type `bigload.errors` documents
for it, with a message that names the fix. Where accelerate fails by accident (an AttributeError, torch's
NotImplementedError, safetensors' own error) bigload raises its own type and the test pins both.
The planning names (`infer_auto_device_map`, `get_balanced_memory`) are compared in `test_compat.py`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

accelerate = pytest.importorskip("accelerate")
import accelerate.utils as acc  # noqa: E402

import bigload  # noqa: E402
from bigload import errors  # noqa: E402
from test_compat import builtin_of  # noqa: E402

PT = {"format": "pt"}  # accelerate refuses safetensors files without it
ABSENT_GPU = torch.cuda.device_count()  # a GPU index no machine running this test has


class ModelForTest(nn.Module):
    """accelerate's own test model (tests/test_modeling_utils.py): 236 bytes, a BatchNorm between Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(3, 4)
        self.batchnorm = nn.BatchNorm1d(4)
        self.linear2 = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.batchnorm(self.linear1(x)))


def on_meta() -> ModelForTest:
    with bigload.init_empty_weights():
        return ModelForTest()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Checkpoints and folders, each wrong in one way, plus a good one and a plain file."""
    root = tmp_path_factory.mktemp("bad")
    state = {name: tensor.contiguous() for name, tensor in ModelForTest().state_dict().items()}

    def safetensors(name: str, tensors: dict[str, torch.Tensor]) -> str:
        save_file(tensors, root / name, metadata=PT)
        return str(root / name)

    paths = {
        "good": safetensors("good.safetensors", state),
        "unexpected": safetensors("unexpected.safetensors", {**state, "foo": torch.rand(4, 5)}),
        "reshaped": safetensors("reshaped.safetensors", {**state, "linear1.bias": torch.ones(7)}),
        "absent": str(root / "absent.safetensors"),
    }
    (root / "empty").mkdir()
    (root / "two").mkdir()
    for name in ("a.index.json", "b.index.json"):
        (root / "two" / name).write_text(json.dumps({"weight_map": {}}))
    (root / "lost").mkdir()
    (root / "lost" / "model.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(state, "gone.safetensors")}))
    (root / "a_file").write_text("not a folder")
    (root / "garbage.safetensors").write_bytes(b"\x00" * 3 + b"nonsense" * 10)
    (root / "garbage.bin").write_bytes(b"nonsense" * 10)
    paths.update({name: str(root / name) for name in ("empty", "two", "lost", "a_file", "garbage.safetensors",
                                                       "garbage.bin")})
    paths["folder"] = str(root / "offload")
    return paths


DISK = {"linear1": "cpu", "batchnorm": "disk", "linear2": "cpu"}
Call = Callable[[object, dict[str, str], str], object]  # (library, files, "accelerate"/"bigload") -> anything


@dataclass(frozen=True)
class Case:
    """A bad input: the call, the built-in accelerate raises, bigload's type and the words of its message."""

    id: str
    call: Call
    builtin: type[BaseException]
    ours: type[errors.BigloadError]
    match: str


def load(checkpoint: str, meta: bool = False, **kwargs: object) -> Call:
    return lambda lib, f, _: lib.load_checkpoint_in_model(on_meta() if meta else ModelForTest(), f[checkpoint],
                                                           **kwargs)


def dispatch(device_map: dict, **kwargs: object) -> Call:
    return lambda lib, f, _: lib.dispatch_model(ModelForTest(), device_map, **kwargs)


def auto(**kwargs: object) -> Call:
    return lambda lib, f, _: lib.load_checkpoint_and_dispatch(on_meta(), f["good"], **kwargs)


def offload_folder_is_a_file(how: str) -> Call:
    def call(lib, f, _):
        if how == "load":
            return lib.load_checkpoint_in_model(on_meta(), f["good"], device_map=DISK, offload_folder=f["a_file"])
        if how == "dispatch":
            return lib.dispatch_model(ModelForTest(), DISK, main_device="cpu", offload_dir=f["a_file"])
        return lib.disk_offload(ModelForTest(), f["a_file"], execution_device="cpu")
    return call


MISMATCH, NOT_FOUND = errors.CheckpointMismatchError, errors.CheckpointNotFoundError
ABSENT = rf"cuda:{ABSENT_GPU} does not exist on this machine"

CASES = [
    # load_checkpoint_in_model: torch's load_state_dict (RuntimeError) without a map, accelerate's checks with one
    Case("unexpected-strict-no-map", load("unexpected", strict=True), RuntimeError, MISMATCH, "1 unexpected: foo"),
    Case("unexpected-strict-no-map-meta", load("unexpected", meta=True, strict=True), RuntimeError, MISMATCH,
         "1 unexpected: foo"),
    Case("unexpected-strict-map", load("unexpected", strict=True, device_map={"": "cpu"}), ValueError, MISMATCH,
         "1 unexpected: foo"),
    Case("unexpected-strict-split-map", load("unexpected", meta=True, strict=True, device_map=DISK | {"batchnorm": "cpu"}),
         ValueError, MISMATCH, "1 unexpected: foo"),
    Case("reshaped-no-map", load("reshaped"), RuntimeError, MISMATCH, r"linear1\.bias \(checkpoint \[7\], model \[4\]\)"),
    Case("reshaped-map", load("reshaped", meta=True, device_map={"": "cpu"}), ValueError, MISMATCH,
         r"linear1\.bias \(checkpoint \[7\], model \[4\]\)"),
    Case("no-such-path", load("absent"), ValueError, NOT_FOUND, "no such checkpoint file or folder"),
    Case("folder-without-checkpoint", load("empty"), ValueError, errors.CheckpointError, "no checkpoint found"),
    Case("folder-with-two-indexes", load("two"), ValueError, errors.CheckpointError,
         r"several files match '\*\.index\.json'"),
    Case("index-names-a-missing-shard", load("lost"), FileNotFoundError, NOT_FOUND,
         "shard 'gone.safetensors' .* is missing"),
    Case("disk-without-offload-folder", load("good", meta=True, device_map=DISK), ValueError, errors.OffloadError,
         "no offload_folder"),
    Case("map-leaves-tensors-unplaced", load("good", device_map={"linear1": "cpu", "batchnorm": "cpu"}), ValueError,
         errors.PlanError, r"places no module holding 2 tensor\(s\), e.g. \['linear2.weight'"),
    Case("map-names-an-absent-gpu", load("good", meta=True, device_map={"": ABSENT_GPU}), RuntimeError,
         errors.DeviceNotFoundError, ABSENT),
    Case("offload-folder-is-a-file", offload_folder_is_a_file("load"), FileExistsError, errors.OffloadIOError,
         "cannot write to the offload folder"),
    # load_checkpoint_and_dispatch: the strategy and the budget
    Case("unknown-strategy", auto(device_map="fastest"), ValueError, errors.PlanError,
         "'fastest' is neither a strategy"),
    Case("budget-key-names-no-device", auto(device_map="auto", max_memory={"tpu": 10**6, "cpu": 10**6}), ValueError,
         errors.DeviceError, "max_memory key 'tpu' names no device"),
    Case("budget-size-unreadable", auto(device_map="auto", max_memory={"cpu": "12XB"}), ValueError,
         errors.BudgetError, "cannot read '12XB' as a size"),
    Case("fits-only-with-disk-and-no-folder", auto(device_map="auto", max_memory={"cpu": 100}), ValueError,
         errors.PlanError, "does not fit"),
    Case("budget-names-an-absent-gpu", auto(device_map="auto", max_memory={ABSENT_GPU: 10**6, "cpu": 10**6}),
         RuntimeError, errors.DeviceNotFoundError, ABSENT),
    # dispatch_model, cpu_offload, disk_offload
    Case("dispatch-map-leaves-tensors-unplaced", dispatch({"linear1": "cpu", "batchnorm": "cpu"}, main_device="cpu"),
         ValueError, errors.PlanError, r"places no module holding 2 tensor\(s\)"),
    Case("dispatch-empty-map", dispatch({}, main_device="cpu"), ValueError, errors.PlanError, "the device map is empty"),
    Case("dispatch-disk-without-offload-dir", dispatch(DISK, main_device="cpu"), ValueError, errors.OffloadError,
         "no offload_dir was given"),
    Case("dispatch-unknown-device", dispatch({"": "tpu"}, main_device="cpu"), RuntimeError, errors.DeviceNotFoundError,
         "unknown device 'tpu'"),
    Case("dispatch-unknown-main-device",
         lambda lib, f, name: lib.dispatch_model(ModelForTest(), DISK, main_device="tpu",
                                                 offload_dir=f"{f['folder']}-main-{name}"),
         RuntimeError, errors.DeviceNotFoundError, "unknown device 'tpu'"),
    Case("dispatch-map-names-an-absent-gpu", dispatch({"linear1": ABSENT_GPU, "batchnorm": "cpu", "linear2": "cpu"}),
         RuntimeError, errors.DeviceNotFoundError, ABSENT),
    Case("dispatch-offload-dir-is-a-file", offload_folder_is_a_file("dispatch"), FileExistsError,
         errors.OffloadIOError, "cannot write to the offload folder"),
    Case("cpu-offload-unknown-device", lambda lib, f, _: lib.cpu_offload(ModelForTest(), execution_device="tpu"),
         RuntimeError, errors.DeviceNotFoundError, "unknown device 'tpu'"),
    Case("cpu-offload-absent-gpu", lambda lib, f, _: lib.cpu_offload(ModelForTest(), execution_device=ABSENT_GPU),
         RuntimeError, errors.DeviceNotFoundError, ABSENT),
    Case("disk-offload-unknown-device",
         lambda lib, f, name: lib.disk_offload(ModelForTest(), f"{f['folder']}-{name}", execution_device="tpu"),
         RuntimeError, errors.DeviceNotFoundError, "unknown device 'tpu'"),
    Case("disk-offload-dir-is-a-file", offload_folder_is_a_file("disk_offload"), FileExistsError,
         errors.OffloadIOError, "cannot write to the offload folder"),
]


def run(call: Call, library: object, files: dict[str, str], name: str) -> BaseException | None:
    try:
        call(library, files, name)
    except Exception as error:  # the point of the test
        return error
    return None


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bigload_raises_the_built_in_accelerate_raises(case: Case, files, caplog):
    with caplog.at_level(logging.CRITICAL):  # accelerate warns about absent devices before failing
        theirs = run(case.call, accelerate, files, "accelerate")
        ours = run(case.call, bigload, files, "bigload")
    assert theirs is not None, "accelerate accepted the input"
    assert builtin_of(theirs) is case.builtin, theirs  # the table in bigload.errors still says what accelerate does
    assert isinstance(ours, case.builtin), ours
    assert isinstance(ours, case.ours), ours
    assert re.search(case.match, str(ours)), str(ours)


def dtype_unknown_to_torch(lib, f, _):
    return lib.load_checkpoint_in_model(on_meta(), f["good"], device_map={"": "cpu"}, dtype="float7")


def meta_weights_to_disk(lib, f, name):
    return lib.disk_offload(on_meta(), f"{f['folder']}-meta-{name}", execution_device="cpu")


ACCIDENTS = [
    # (call, what accelerate raises by accident, bigload's type, its words)
    (dtype_unknown_to_torch, "AttributeError", errors.BudgetError, "unknown dtype 'float7'"),
    (load("garbage.safetensors"), "SafetensorError", errors.CheckpointError, "the header claims"),
    (load("garbage.bin"), "UnpicklingError", errors.CheckpointError, "cannot list this PyTorch checkpoint"),
    (meta_weights_to_disk, "NotImplementedError", errors.OffloadError, "is on the meta device"),
]


@pytest.mark.parametrize("call, accident, ours_type, match", ACCIDENTS,
                         ids=["dtype-unknown-to-torch", "corrupt-safetensors", "corrupt-pickle", "meta-weights-to-disk"])
def test_where_accelerate_fails_by_accident_bigload_raises_its_own_type(call, accident, ours_type, match, files):
    """Not mirrored: these built-ins come from code that breaks (getattr(torch, "float7"), a copy out of a meta
    tensor), not from a check accelerate's users could rely on."""
    theirs = run(call, accelerate, files, "accelerate")
    ours = run(call, bigload, files, "bigload")
    assert type(theirs).__name__ == accident, theirs
    assert type(ours) is ours_type and re.search(match, str(ours)), ours


def test_offload_io_error_is_the_os_error_of_its_errno():
    """Like OSError(errno, ...), which Python turns into FileExistsError, PermissionError, ..."""
    import errno
    import pickle

    for code, kind in ((errno.EEXIST, FileExistsError), (errno.EACCES, PermissionError), (errno.ENOSPC, OSError)):
        error = errors.OffloadIOError("cannot write to the offload folder x", code)
        assert isinstance(error, kind) and isinstance(error, errors.OffloadError) and isinstance(error, ValueError)
        assert error.errno == code and str(error) == "cannot write to the offload folder x"
        assert type(error).__name__ == "OffloadIOError"
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and again.errno == code and str(again) == str(error)


# --------------------------------------------------------------------------------------------------
# accelerate's own test: tests/test_modeling_utils.py::test_load_checkpoint_in_model_unexpected_keys


@pytest.mark.parametrize("device_map", [None, {"": "cpu"}])
def test_load_checkpoint_in_model_unexpected_keys(device_map, tmp_path, caplog):
    """accelerate's test, run on bigload: a real model, its state dict plus one tensor it lacks, saved with
    torch.save; the default skips the tensor with accelerate's warning, strict=True raises an error that
    `except (ValueError, RuntimeError)` catches."""
    model = ModelForTest()
    state_dict = model.state_dict()
    state_dict["foo"] = torch.rand(4, 5)
    path = tmp_path / "model.pt"
    torch.save(state_dict, path)

    model = ModelForTest()
    with caplog.at_level(logging.INFO):
        bigload.load_checkpoint_in_model(model, str(path), device_map=device_map)
    assert any("were not used when" in record.getMessage() for record in caplog.records)
    with pytest.raises((ValueError, RuntimeError), match="1 unexpected: foo"):
        bigload.load_checkpoint_in_model(model, str(path), device_map=device_map, strict=True)
