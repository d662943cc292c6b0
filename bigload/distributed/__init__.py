"""A model split over `torchrun` ranks: every rank plans the same split, loads only its stage, and hidden
states cross over `torch.distributed` (`pipeline`, `wire`)."""

from bigload.distributed.pipeline import from_pretrained_distributed, stop_pipeline

__all__ = ["from_pretrained_distributed", "stop_pipeline"]
