"""A model split over `torchrun` ranks: every rank plans the same split, loads only its stage, and hidden
states cross over `torch.distributed`.

Modules, in the order a load goes through them: `startup` (process group, budgets, the link), `agreement`
(the ranks check they were given the same inputs), `stage` (what a rank keeps of the model), `pipeline` (the
entry point, `from_pretrained_distributed`), then at run time `remote` (rank 0's stand-in for the other
ranks' blocks, and the `Pipeline` handle), `server` (ranks 1..N-1 serving their blocks) and `wire` (the
messages between ranks).
"""

from bigload.distributed.pipeline import from_pretrained_distributed
from bigload.distributed.remote import stop_pipeline

__all__ = ["from_pretrained_distributed", "stop_pipeline"]
