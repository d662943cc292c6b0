"""Executing a plan's placement: the streaming loader, the offload store, read-ahead and explicit reads.

Nothing here decides where a tensor goes or in which dtype: the `Plan` (and its inventory) says; the loader
reads each tensor once and puts it there.
"""
