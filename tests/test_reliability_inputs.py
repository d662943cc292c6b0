"""Reliability: every bad input a stranger can hand bigload fails with the right error class and a message
that names the file (and tensor) and the fix, through every entry point; nothing foreign ever runs.

The corpus lives in `bad_inputs/corpus.py`. `test_checkpoint.py`, `test_store.py`, `test_stream.py` and
`test_dispatch.py` check many single cases at the module they belong to; this file runs the whole corpus
through `open_checkpoint`, the loader, a sharded index and the CLI, and adds the cases they do not have.
See `docs/reliability.md` for the map of which test proves what.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bad_inputs.corpus import (
    INDEX_CASES,
    OFFLOAD_ENTRY_CASES,
    PICKLE_BUILDERS,
    SAFETENSORS_CASES,
    Case,
    two_shards,
)
from bad_inputs.models import DISK_MAP, meta_tiny, save_reference
from bigload.formats.mapped import CheckpointReader
from bigload.formats.discover import open_checkpoint
from bigload.cli.commands import main as cli_main
from bigload.errors import CheckpointError, OffloadError
from bigload.load.store import DiskStore
from bigload.load.store_writer import StoreWriter
from bigload.integrations.loading import load_checkpoint_in_model


def _ids(cases: tuple[Case, ...]) -> list[str]:
    return [case.id for case in cases]


def _no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CheckpointReader, "read", lambda self, ref: pytest.fail(f"read {ref.name} of a bad input"))


# --- malformed safetensors files -----------------------------------------------------------------------


@pytest.mark.parametrize("case", SAFETENSORS_CASES, ids=_ids(SAFETENSORS_CASES))
def test_malformed_safetensors_fails_with_checkpoint_error_naming_file(tmp_path: Path, case: Case) -> None:
    path = case.build(tmp_path)
    with pytest.raises(case.error, match=case.match) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert str(path.resolve()) in message, "the message must name the file"
    assert case.names in message
    assert len(message) < 2000, "a lying header must not be echoed into the message whole"


@pytest.mark.parametrize("case", SAFETENSORS_CASES, ids=_ids(SAFETENSORS_CASES))
def test_malformed_safetensors_through_the_loader_fails_before_placing_anything(
        tmp_path: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    path = case.build(tmp_path)
    _no_reads(monkeypatch)
    model = nn.Linear(2, 2, device="meta")
    with pytest.raises(case.error, match=case.match):
        load_checkpoint_in_model(model, path.parent, {"": "cpu"})
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("case", SAFETENSORS_CASES, ids=_ids(SAFETENSORS_CASES))
def test_malformed_shard_of_an_index_names_the_shard(tmp_path: Path, case: Case) -> None:
    index = two_shards(tmp_path)
    (tmp_path / "bad").mkdir()
    bad = case.build(tmp_path / "bad")
    (tmp_path / "s2.safetensors").write_bytes(bad.read_bytes())
    with pytest.raises(CheckpointError, match=r"s2\.safetensors"):
        open_checkpoint(index)


CLI_CASES = tuple(case for case in SAFETENSORS_CASES if case.id in {
    "empty-file", "truncated-in-data", "header-len-2**60", "not-json", "json-array", "json-deeply-nested",
    "json-5000-digit-int", "dtype-not-a-string", "offsets-overlap"})


@pytest.mark.parametrize("case", CLI_CASES, ids=_ids(CLI_CASES))
def test_cli_inspect_prints_one_line_and_exits_2(tmp_path: Path, case: Case,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = case.build(tmp_path)
    assert cli_main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigload: error: ") and "Traceback" not in err
    assert re.search(case.match, err), err


# --- sharded indexes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", INDEX_CASES, ids=_ids(INDEX_CASES))
def test_bad_shard_index_fails_with_checkpoint_error(tmp_path: Path, case: Case) -> None:
    path = case.build(tmp_path)
    with pytest.raises(case.error, match=case.match) as caught:
        open_checkpoint(path)
    assert path.name in str(caught.value) or "s2.safetensors" in str(caught.value)


def test_shards_reached_through_symlinks_still_load(tmp_path: Path) -> None:
    """The Hugging Face cache links each shard to a blob outside the snapshot folder: that is fine, only the
    names in the index must stay inside the folder."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    two_shards(blobs)
    for name in ("s1.safetensors", "s2.safetensors", "model.safetensors.index.json"):
        (snapshot / name).symlink_to(blobs / name)
    assert sorted(open_checkpoint(snapshot).tensors) == ["a", "b"]


# --- pickles that try to run code ----------------------------------------------------------------------


@pytest.mark.parametrize("builder", list(PICKLE_BUILDERS.values()), ids=list(PICKLE_BUILDERS))
def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path, builder, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    path = builder(ckpt, marker)
    with pytest.raises(CheckpointError, match=r"refused to unpickle.*could run code|zip format") as caught:
        open_checkpoint(path)
    assert "pytorch_model" in str(caught.value) and "safetensors" in str(caught.value)
    _no_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"refused to unpickle.*could run code|zip format"):
        load_checkpoint_in_model(nn.Linear(2, 2, device="meta"), ckpt, {"": "cpu"})
    assert cli_main(["inspect", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigload: error: ") and "Traceback" not in err
    assert not marker.exists(), "the pickle's payload ran"


# --- checkpoint vs model (single cases are in test_stream.py; here: all three at once, sharded) --------


def test_sharded_checkpoint_not_matching_the_model_is_refused_before_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bad_inputs.models import reference

    state = {k: v.contiguous() for k, v in reference().state_dict().items()}
    del state["layers.1.weight"]  # missing
    state["layers.9.weight"] = torch.ones(2)  # extra
    state["head.bias"] = torch.ones(5)  # shape mismatch (model: [4])
    names = sorted(state)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({k: state[k] for k in names[:4]}, folder / "s1.safetensors")
    save_file({k: state[k] for k in names[4:]}, folder / "s2.safetensors")
    weight_map = {k: "s1.safetensors" if i < 4 else "s2.safetensors" for i, k in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _no_reads(monkeypatch)
    model = meta_tiny()
    pattern = (r"1 missing: layers\.1\.weight; 1 unexpected: layers\.9\.weight; 1 with mismatched shapes: "
               r"head\.bias \(checkpoint \[5\], model \[4\]\).*another shape")
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint_in_model(model, folder, DISK_MAP, offload_folder=tmp_path / "offload", strict=True)
    assert not (tmp_path / "offload").exists(), "a refused load must not create the offload folder"


# --- offload folders -----------------------------------------------------------------------------------


def test_offload_folder_under_a_regular_file_is_refused_before_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = save_reference(tmp_path / "ckpt")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    _no_reads(monkeypatch)
    with pytest.raises(OffloadError, match=r"cannot write to the offload folder .*not-a-folder/offload.*pass an "
                                           r"offload_folder you can write to"):
        load_checkpoint_in_model(meta_tiny(), ckpt, DISK_MAP, offload_folder=blocker / "offload",
                                 dtype=torch.float16)


def test_read_only_offload_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        probe = folder / "probe"
        try:
            probe.write_bytes(b"")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running as root: chmod does not stop writes (the regular-file case covers this)")
        with pytest.raises(OffloadError, match="cannot write to the offload folder"):
            StoreWriter(folder)
    finally:
        folder.chmod(0o700)


def test_offload_folder_built_from_another_checkpoint_is_refused(tmp_path: Path) -> None:
    first, second = save_reference(tmp_path / "a", seed=0), save_reference(tmp_path / "b", seed=1)
    # Same tensor names, shapes, file size and (as `cp -p` or a tar extraction leaves them) mtime: only the
    # bytes differ. Reusing the folder would silently run model `a` with checkpoint `b`.
    stat = first.stat()
    os.utime(second, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    folder = tmp_path / "offload"
    load_checkpoint_in_model(meta_tiny(), first, DISK_MAP, offload_folder=folder, dtype=torch.float16)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with pytest.raises(OffloadError, match=r"holds weights from .*/a .*not from .*/b .*another offload_folder, "
                                           r"or delete"):
        load_checkpoint_in_model(meta_tiny(), second, DISK_MAP, offload_folder=folder, dtype=torch.float16)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before, "the refused folder was touched"


def test_offload_folder_of_a_checkpoint_rewritten_since_is_refused(tmp_path: Path) -> None:
    """Same path, new weights: reusing the folder would silently give the old model."""
    ckpt = save_reference(tmp_path / "ckpt", seed=0)
    folder = tmp_path / "offload"
    load_checkpoint_in_model(meta_tiny(), ckpt, DISK_MAP, offload_folder=folder, dtype=torch.float16)
    save_reference(tmp_path / "ckpt", seed=1)
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    with pytest.raises(OffloadError, match="holds weights from"):
        load_checkpoint_in_model(meta_tiny(), ckpt, DISK_MAP, offload_folder=folder, dtype=torch.float16)


def test_offload_folder_written_by_accelerate_is_not_trusted_for_a_load(tmp_path: Path) -> None:
    from accelerate.utils import offload_state_dict

    from bad_inputs.models import reference

    ckpt = save_reference(tmp_path / "ckpt")
    folder = tmp_path / "offload"
    offload_state_dict(str(folder), {k: v.half() for k, v in reference().state_dict().items()})
    with pytest.raises(OffloadError, match="bigload did not write.*cannot be checked.*another offload_folder"):
        load_checkpoint_in_model(meta_tiny(), ckpt, DISK_MAP, offload_folder=folder, dtype=torch.float16)


def test_damaged_offload_folder_is_reported_by_the_loader(tmp_path: Path) -> None:
    ckpt = save_reference(tmp_path / "ckpt")
    folder = tmp_path / "offload"
    load_checkpoint_in_model(meta_tiny(), ckpt, DISK_MAP, offload_folder=folder, dtype=torch.float16)
    (folder / "head.weight.dat").write_bytes(b"\0" * 7)
    with pytest.raises(OffloadError, match=r"head\.weight\.dat: the data of 'head.weight' has 7 bytes.*Delete"):
        load_checkpoint_in_model(meta_tiny(), ckpt, DISK_MAP, offload_folder=folder, dtype=torch.float16)


@pytest.mark.parametrize(("content", "match"), [(c, m) for _, c, m in OFFLOAD_ENTRY_CASES],
                         ids=[i for i, _, _ in OFFLOAD_ENTRY_CASES])
def test_corrupt_offload_index_raises_offload_error(tmp_path: Path, content: object, match: str) -> None:
    with StoreWriter(tmp_path) as store:
        store.put("w", torch.ones(3))
        store.commit("fp")
    (tmp_path / "index.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(OffloadError, match=match) as caught:
        DiskStore.open(tmp_path)
    assert str(tmp_path) in str(caught.value)


# --- max_memory and plans, at the entry point (planner-level cases are in test_plan.py) ----------------


@pytest.mark.parametrize(("max_memory", "error", "match"), [
    ({"cpu": "lots"}, "BudgetError", r"max_memory\['cpu'\]: cannot read 'lots' as a size.*e\.g\. '24GiB'"),
    ({"cpu": "24 GiBs"}, "BudgetError", r"max_memory\['cpu'\]: cannot read"),
    ({"cpu": "-1GiB"}, "BudgetError", r"max_memory\['cpu'\]: '-1GiB' is negative"),
    ({"cpu": -5}, "BudgetError", "is negative"),
    ({"cpu": float("inf")}, "BudgetError", "not a finite size"),
    ({"cpu": float("nan")}, "BudgetError", "size"),
    ({"cpu": []}, "BudgetError", r"\[\] is not a size"),
    ({"cpu": True}, "BudgetError", "not a size"),
    ({"npu": "1GiB"}, "DeviceError", "max_memory key 'npu' names no device; use a GPU index"),
    ({-1: "1GiB"}, "DeviceError", "max_memory key -1 names no device"),
    ({"0": "1GB", 0: "2GB"}, "BudgetError", "names cuda:0 twice"),
    ({}, "BudgetError", "max_memory is empty"),
    ("cpu=1GiB", "BudgetError", "max_memory must be a dict"),
], ids=["word", "bad-unit", "negative-str", "negative-int", "inf", "nan", "list", "bool", "unknown-device",
        "negative-gpu", "duplicate", "empty", "not-a-dict"])
def test_bad_max_memory_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  max_memory: object, error: str, match: str) -> None:
    import bigload.errors
    from bigload.integrations.loading import load_checkpoint_and_dispatch

    ckpt = save_reference(tmp_path / "ckpt")
    _no_reads(monkeypatch)
    with pytest.raises(getattr(bigload.errors, error), match=match):
        load_checkpoint_and_dispatch(meta_tiny(), ckpt, device_map="auto", max_memory=max_memory)


def test_model_that_fits_nowhere_without_disk_says_what_is_missing(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from bigload.integrations.loading import load_checkpoint_and_dispatch
    from bigload.errors import PlanError

    ckpt = save_reference(tmp_path / "ckpt")
    _no_reads(monkeypatch)
    model = meta_tiny()
    with pytest.raises(PlanError, match=r"(?s)does not fit.*block 'embed'.*cpu: budget 1.00 KiB.*missing.*"
                                        r"add a disk budget and an offload folder") as caught:
        load_checkpoint_and_dispatch(model, ckpt, device_map="auto", max_memory={"cpu": "1KiB"})
    assert "bytes) are missing" in str(caught.value)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_max_memory_naming_a_gpu_this_machine_lacks_is_refused_on_load(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning for another machine is fine (a dry run); loading onto its GPUs is not, and the message must
    point at max_memory, which is what the user wrote."""
    from bigload.integrations.loading import load_checkpoint_and_dispatch
    from bigload.errors import DeviceError

    gpus = torch.cuda.device_count()
    ckpt = save_reference(tmp_path / "ckpt")
    _no_reads(monkeypatch)
    with pytest.raises(DeviceError, match=rf"cuda:{gpus + 7} does not exist on this machine.*max_memory"):
        load_checkpoint_and_dispatch(meta_tiny(), ckpt, device_map="auto",
                                     max_memory={gpus + 7: "1GiB", "cpu": "1KiB"})
