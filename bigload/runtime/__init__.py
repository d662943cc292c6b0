"""Executing a plan at run time: hooks that bring offloaded blocks in just in time, with prefetch.

The runtime reads the `Plan` (devices, execution devices, slots, disk reads) and the weight sources the
loader filled; it decides nothing about placement.
"""

from bigload.runtime.interop import adopt, take_back_placement
from bigload.runtime.merges import check_merges
from bigload.runtime.moves import DEFAULT_SKIP_KEYS, OutputAlignment, send_to_device
from bigload.runtime.placeholders import OffloadedBuffer, OffloadedParameter
from bigload.runtime.prefetch import PrefetchStats
from bigload.runtime.runtime import Runtime, attach, detach, runtime_of
from bigload.runtime.weights import HostWeights, WeightSource

__all__ = ["DEFAULT_SKIP_KEYS", "HostWeights", "OffloadedBuffer", "OffloadedParameter", "OutputAlignment",
           "PrefetchStats", "Runtime", "WeightSource", "adopt", "attach", "check_merges", "detach", "runtime_of",
           "send_to_device", "take_back_placement"]
