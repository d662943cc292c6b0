"""Checkpoint formats: headers and byte readers, keyed by file suffix. Knows nothing of devices or plans.

A reader turns a file into `TensorRef`s (name, dtype, shape, where its bytes lie) from headers alone
(`safetensors`, `torch_archive`; `discover` finds and opens files, folders and shard indexes into a
`CheckpointIndex`), and maps those bytes when asked (`mapped`; page-cache calls in `pages`). The planner sizes
from the refs; the loader (`bigload.load`) reads through them.
"""

from bigload.formats.discover import checkpoint_tensor_names, open_checkpoint
from bigload.formats.mapped import CheckpointReader, MappedFiles
from bigload.formats.refs import CheckpointIndex, Extent, TensorRef

__all__ = ["CheckpointIndex", "CheckpointReader", "Extent", "MappedFiles", "TensorRef", "checkpoint_tensor_names",
           "open_checkpoint"]
