"""Executing a plan at run time: hooks that bring offloaded blocks in just in time, with prefetch.

The runtime reads the `Plan` (devices, execution devices, slots, disk reads) and the weight sources the
loader filled; it decides nothing about placement.
"""
