"""bigload's benchmarks, side by side with accelerate and transformers. Run them with `python -m benchmarks`."""
