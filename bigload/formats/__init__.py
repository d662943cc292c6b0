"""Checkpoint formats: headers and byte readers, keyed by file suffix. Knows nothing of devices or plans.

A reader turns a file into `TensorRef`s (name, dtype, shape, where its bytes lie) from headers alone, and
maps those bytes when asked. The planner sizes from the refs; the loader (`bigload.load`) reads through them.
"""
