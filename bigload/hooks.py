"""`bigload.hooks`: the runtime's public names under the module path earlier releases gave them
(`bigload.hooks.runtime_of(model).stats()`). The runtime itself is the `bigload.runtime` package."""

from bigload.runtime import (
    DEFAULT_SKIP_KEYS,
    HostWeights,
    OutputAlignment,
    PrefetchStats,
    Runtime,
    WeightSource,
    attach,
    detach,
    runtime_of,
    send_to_device,
)

__all__ = ["DEFAULT_SKIP_KEYS", "HostWeights", "OutputAlignment", "PrefetchStats", "Runtime", "WeightSource", "attach",
           "detach", "runtime_of", "send_to_device"]
