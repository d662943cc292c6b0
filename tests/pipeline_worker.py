"""The ranks of a pipeline test: `python pipeline_worker.py FOLDER OUT SCENARIO WORLD`.

The process imports torch and transformers and builds the model on meta once (no computation, so forking
is safe), then forks one child per rank: the ranks are real processes that did not each pay for the imports.
Like torchrun's agent, the parent then hosts the ranks' TCPStore on a port the store binds itself (port 0:
no port is picked free and released, which another process could take in between) and hands the port to the
children, which find it in MASTER_PORT with TORCHELASTIC_USE_AGENT_STORE=True, as torchrun sets them, and
join the store as clients. Each rank writes what happened to OUT/rank-N.json. The parent waits for rank 0,
gives the others `GRACE` seconds, kills what is left (a hung rank) and exits.

Scenarios: "generate" (rank 0 generates greedily for batch 1 and a left-padded batch 2), "mismatch" (rank 1
is given another dtype), "kill" (rank 1 dies in the middle of the batch-2 generation), "hang" (rank 1 stops
answering in the middle of the batch-1 generation; the timeout is 5 s), "rank0-dies" (rank 0 dies in the
middle of the batch-2 generation), "rank0-stops" (rank 0 is stopped by SIGSTOP there; the idle timeout is
5 s), "missing-rank" (one rank fewer is started than WORLD_SIZE says; the timeout is 5 s), "other-weights"
(rank 1 loads FOLDER-other, the same model with other weights), "shared-offload" (every rank gets a budget
that sends blocks to disk, and the same offload folder: OUT/../offload).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

PROMPTS = [[3, 17, 5, 42, 9, 11, 64], [0, 0, 0, 8, 23, 7, 90]]  # row 2 left-padded (pad id 0)
MASKS = [[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]]
NEW_TOKENS = 6


GRACE = 30.0


def launch() -> None:
    folder, out, scenario, world = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    from torch.distributed import TCPStore

    from bigload.integrations.hf import meta_model_for_folder

    meta_model_for_folder(folder)  # every import the ranks need, done once before forking
    children, ports = [], []
    for rank in range(world - 1 if scenario == "missing-rank" else world):
        port_in, port_out = os.pipe()
        pid = os.fork()
        if pid == 0:
            for fd in (port_out, *ports):
                os.close(fd)
            code = 0
            try:
                port = os.read(port_in, 16).decode()  # once the parent's store listens
                os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                  LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                  TORCHELASTIC_USE_AGENT_STORE="True")
                run_rank(folder, out, scenario, rank)
            except BaseException:  # a child must never return into the launcher's loop
                code = 1
            os._exit(code)
        os.close(port_in)
        children.append(pid)
        ports.append(port_out)
    # Created after the forks: the store serves from a thread, which a forked child would not have.
    store = TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    for fd in ports:
        os.write(fd, str(store.port).encode())
        os.close(fd)
    os.waitpid(children[0], os.WUNTRACED)  # rank 0 ended, or was stopped ("rank0-stops")
    deadline = time.monotonic() + (0 if scenario == "hang" else GRACE)
    for pid in children[1:]:
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.1)
    for pid in children:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def run_rank(folder: Path, out: Path, scenario: str, rank: int) -> None:
    torch.set_num_threads(1)
    import bigload
    from bigload.distributed.remote import RemoteStages
    from bigload.distributed.server import StageServer

    if scenario in ("kill", "hang") and rank == 1:
        _fail_at_step(StageServer, "_step", 8 if scenario == "kill" else 3, scenario)
    if scenario in ("rank0-dies", "rank0-stops") and rank == 0:
        _fail_at_step(RemoteStages, "forward", 8, "kill" if scenario == "rank0-dies" else "stop")
    dtype = "bfloat16" if scenario == "mismatch" and rank == 1 else None
    timeout = 5 if scenario in ("hang", "missing-rank") else 20
    idle_timeout = 5 if scenario == "rank0-stops" else 60
    if scenario == "other-weights" and rank == 1:
        folder = folder.with_name(folder.name + "-other")
    offload = {"max_memory": {"cpu": "62KB", "disk": "1GB"}, "prefetch": 0, "offload_folder": out.parent / "offload"}
    record: dict = {"rank": rank}
    try:
        model = bigload.from_pretrained(folder, distributed=True, dtype=dtype, progress=False,
                                        pipeline={"timeout": timeout, "idle_timeout": idle_timeout},
                                        **(offload if scenario == "shared-offload" else {}))
        if model is not None:
            pipeline = model.bigload_pipeline
            record["loads"] = [load.__dict__ | {"files": list(load.files)} for load in pipeline.loads]
            _generate(model, record)
            record["comm_per_token"] = pipeline.stats.comm_seconds_per_token
            bigload.stop_pipeline(model)
            try:
                _generate(model)
            except bigload.DistributedError as error:
                record["after_stop"] = str(error)
    except Exception as error:  # any type: the tests assert it is bigload's DistributedError
        record["error"] = f"{type(error).__name__}: {error}"
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


def _fail_at_step(cls: type, method: str, step: int, how: str) -> None:
    """Make this rank die (os._exit), hang (sleep) or stop (SIGSTOP) at its `step`-th call of `cls.method`
    (a message served, or a hidden state sent around the ring)."""
    original = getattr(cls, method)
    seen = []

    def failing(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(args)
        if len(seen) == step:
            if how == "kill":
                os._exit(9)
            if how == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(60)
        return original(self, *args, **kwargs)

    setattr(cls, method, failing)


def _generate(model: torch.nn.Module, record: dict | None = None) -> dict:
    """Greedy tokens for batch 1, then a left-padded batch 2 (each one prefill + NEW_TOKENS - 1 decodes)."""
    result = {} if record is None else record
    with torch.inference_mode():
        one = model.generate(torch.tensor(PROMPTS[:1]), attention_mask=torch.ones(1, 7, dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        result["batch1"] = one[:, 7:].tolist()
        two = model.generate(torch.tensor(PROMPTS), attention_mask=torch.tensor(MASKS),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        result["batch2"] = two[:, 7:].tolist()
    return result


if __name__ == "__main__":
    launch()
