"""One offload folder used by several processes at once: loads that would write it at the same time take turns
(`load.store_lock.FolderLock`), a load that waits too long names the process holding the folder, and a model
whose folder another process rewrote never runs on bytes it did not check (`OffloadError` naming the file).

Every case runs real processes on one folder; each model's output is compared with the same model in memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import bigload.load.store_lock as store_lock
from bigload import init_empty_weights, load_checkpoint_and_dispatch
from bigload.errors import OffloadError
from fixtures_models import llama_map, reference_llama
from timeouts import with_timeout

TESTS = Path(__file__).resolve().parent
PROMPT = torch.tensor([[3, 17, 5, 42, 9, 11, 64]])
DISK_MAP = llama_map([2, 3])
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A float32 checkpoint, loaded in bfloat16: both loads write `.dat` files, under the same names."""
    folder = tmp_path_factory.mktemp("concurrency") / "llama"
    reference_llama().save_pretrained(folder)
    return folder


def load(checkpoint: Path, offload: Path | None, quantize: str | None, device_map=DISK_MAP, **kwargs):
    from transformers import AutoConfig, LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(AutoConfig.from_pretrained(checkpoint))
    return load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map, offload_folder=offload,
                                        dtype=torch.bfloat16, quantize=quantize, progress=False, **kwargs).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return with_timeout(lambda: model(PROMPT).logits.float(), 60)


def in_memory(checkpoint: Path, quantize: str | None) -> torch.Tensor:
    """The same load with every layer in memory: what the offloaded model must give, bit for bit."""
    return logits(load(checkpoint, None, quantize, device_map={"": "cpu"}))


# A loader process. The two run at once on one folder; marks in SYNC order them so that, without a lock, the
# unquantized load writes its files over the int8 load's after the int8 store was checked and before the int8
# model reads them (the interleaving seen in the field). With the lock the unquantized load waits for the int8
# load to commit, and then finds its folder holding another scheme.
LOADER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import torch
    import bigload.load.store_writer as store_writer
    from bigload.errors import OffloadError
    from test_store_concurrency import DISK_MAP, PROMPT, load

    role, checkpoint, offload, sync, out = sys.argv[1], *map(Path, sys.argv[2:6])

    def mark(name):
        (sync / name).write_text(str(os.getpid()))

    def wait_for(name, seconds):
        deadline = time.monotonic() + seconds
        while not (sync / name).exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    real_init, real_put = store_writer.StoreWriter.__init__, store_writer.StoreWriter.put

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        mark(role + "-writer")

    def put(self, *args, **kwargs):
        if not getattr(self, "_test_started", False):
            self._test_started = True
            if role == "int8":
                mark("int8-writing")
                wait_for("plain-writer", 5)  # never comes while the int8 load holds the folder
            else:
                wait_for("int8-loaded", 60)
        return real_put(self, *args, **kwargs)

    store_writer.StoreWriter.__init__, store_writer.StoreWriter.put = init, put
    if role == "plain":
        wait_for("int8-writing", 60)
    result = {}
    try:
        model = load(checkpoint, offload, "int8" if role == "int8" else None)
        if role == "int8":
            mark("int8-loaded")
            wait_for("plain-finished", 60)
        with torch.no_grad():
            result["logits"] = model(PROMPT).logits.float().tolist()
    except OffloadError as error:
        result["error"] = str(error)
    finally:
        if role == "plain":
            mark("plain-finished")
        out.write_text(json.dumps(result))
    """
)


def test_an_int8_and_an_unquantized_load_into_one_folder_at_once_never_give_wrong_outputs(checkpoint, tmp_path):
    offload, sync = tmp_path / "offload", tmp_path / "sync"
    sync.mkdir()
    children = {role: subprocess.Popen([sys.executable, "-c", LOADER, role, str(checkpoint), str(offload), str(sync),
                                        str(tmp_path / f"{role}.json")], env=ENV, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)
                for role in ("int8", "plain")}
    for role, child in children.items():
        output = child.communicate(timeout=300)[0].decode()
        assert child.returncode == 0, f"{role}: {output}"
    outcome = {role: json.loads((tmp_path / f"{role}.json").read_text()) for role in children}
    expected = {"int8": in_memory(checkpoint, "int8"), "plain": in_memory(checkpoint, None)}
    assert not torch.equal(expected["int8"], expected["plain"])
    for role, result in outcome.items():
        if "logits" in result:
            torch.testing.assert_close(torch.tensor(result["logits"]), expected[role], rtol=0, atol=0, msg=role)
        else:
            assert str(offload) in result["error"] and "quantize" in result["error"], result["error"]
    assert "logits" in outcome["int8"], "the load that took the folder first runs"
    # The unquantized load waited for the int8 load's commit, then found another scheme there.
    assert "written with quantize='int8', and this load asks for no quantization" in outcome["plain"]["error"]


# Another process dispatching its own model (other weights, same names, dtypes and shapes) into the folder a live
# model was loaded into: `dispatch_model` always rewrites its offload_dir.
REWRITER = textwrap.dedent(
    """
    import sys
    import torch
    from bigload import dispatch_model
    from fixtures_models import reference_llama
    from test_store_concurrency import DISK_MAP

    dispatch_model(reference_llama(dtype=torch.bfloat16, seed=1), DISK_MAP, offload_dir=sys.argv[1])
    """
)


@pytest.mark.parametrize("disk_reads", ["mapped", "read"])
def test_a_model_whose_folder_another_process_rewrote_refuses_the_new_bytes(checkpoint, tmp_path, disk_reads):
    offload = tmp_path / "offload"
    model = load(checkpoint, offload, None, disk_reads=disk_reads)
    done = subprocess.run([sys.executable, "-c", REWRITER, str(offload)], env=ENV, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    with pytest.raises(OffloadError, match=r"model\.layers\.[23]\..*\.dat.*(replaced|changed) after .*load the "
                                           r"model again") as error:
        logits(model)
    assert str(offload) in str(error.value)
    if disk_reads == "read":
        return  # explicit reads open files by name: any file changed since the store was checked is refused
    # A model that mapped its blocks before the rewrite keeps the bytes it checked (the old files stay mapped).
    offload2 = tmp_path / "offload2"
    early = load(checkpoint, offload2, None)
    before = logits(early)
    torch.testing.assert_close(before, in_memory(checkpoint, None), rtol=0, atol=0)
    done = subprocess.run([sys.executable, "-c", REWRITER, str(offload2)], env=ENV, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    torch.testing.assert_close(logits(early), before, rtol=0, atol=0)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from bigload.load.store_writer import StoreWriter

    writer = StoreWriter(sys.argv[1])
    writer.put("x", torch.ones(4))
    Path(sys.argv[2]).write_text("holding")
    time.sleep(120)
    """
)


def test_a_load_waiting_too_long_for_a_folder_names_the_process_holding_it(checkpoint, tmp_path, monkeypatch):
    offload, ready = tmp_path / "offload", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(offload), str(ready)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert holder.poll() is None, holder.stdout.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the holder never took the folder"
            time.sleep(0.05)
        monkeypatch.setattr(store_lock, "LOCK_TIMEOUT_S", 0.5)
        with pytest.raises(OffloadError, match=rf"{offload}.* process {holder.pid}\b.*another offload_folder"):
            load(checkpoint, offload, None)
        assert not (offload / "index.json").exists()  # nothing written while the other process holds it
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone (its lock goes with it), the folder loads.
    torch.testing.assert_close(logits(load(checkpoint, offload, None)), in_memory(checkpoint, None), rtol=0, atol=0)


def test_a_model_keeps_running_when_another_plan_of_the_same_load_rebuilds_its_folder(checkpoint, tmp_path):
    """Another plan of the same load (other layers on disk) rebuilds the folder with the same bytes under the same
    names: the files are new, yet what a model loaded before reads from them is what it checked, so it runs on."""
    offload = tmp_path / "offload"
    first = load(checkpoint, offload, None)  # layers 2 and 3 on disk, not read yet
    load(checkpoint, offload, None, device_map=llama_map([1, 2, 3]))  # the store holds layer 1 too: rebuilt
    torch.testing.assert_close(logits(first), in_memory(checkpoint, None), rtol=0, atol=0)
