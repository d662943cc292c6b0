"""One rank of a pipeline test: `python pipeline_worker.py FOLDER OUT SCENARIO` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (as torchrun sets them). Writes what happened to OUT/rank-N.json.

Scenarios: "generate" (rank 0 generates greedily for batch 1 and a left-padded batch 2), "mismatch" (rank 1
is given another dtype), "kill" (rank 1 dies in the middle of generation).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

PROMPTS = [[3, 17, 5, 42, 9, 11, 64], [0, 0, 0, 8, 23, 7, 90]]  # row 2 left-padded (pad id 0)
MASKS = [[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]]
NEW_TOKENS = 6


def main() -> None:
    folder, out, scenario = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    import bigload
    from bigload import distributed

    if scenario == "kill" and rank == 1:
        step = distributed.StageServer._step
        calls = []

        def dying(self, header):  # type: ignore[no-untyped-def]
            calls.append(header)
            if len(calls) == 3:
                os._exit(9)
            return step(self, header)

        distributed.StageServer._step = dying
    dtype = "bfloat16" if scenario == "mismatch" and rank == 1 else None
    record: dict = {"rank": rank}
    try:
        model = bigload.from_pretrained(folder, distributed=True, dtype=dtype, progress=False,
                                        pipeline={"timeout": 20, "idle_timeout": 60})
        if model is not None:
            record.update(_generate(model))
            pipeline = model.bigload_pipeline
            record["loads"] = [load.__dict__ | {"files": list(load.files)} for load in pipeline.loads]
            record["comm_per_token"] = pipeline.stats.comm_seconds_per_token
            bigload.stop_pipeline(model)
    except bigload.BigloadError as error:
        record["error"] = f"{type(error).__name__}: {error}"
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


def _generate(model: torch.nn.Module) -> dict:
    result = {}
    with torch.inference_mode():
        one = model.generate(torch.tensor(PROMPTS[:1]), attention_mask=torch.ones(1, 7, dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        result["batch1"] = one[:, 7:].tolist()
        two = model.generate(torch.tensor(PROMPTS), attention_mask=torch.tensor(MASKS),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        result["batch2"] = two[:, 7:].tolist()
    return result


if __name__ == "__main__":
    main()
