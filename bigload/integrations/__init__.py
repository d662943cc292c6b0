"""The ecosystem's names and formats on top of bigload's pipeline: accelerate's loading and device-map
functions, transformers model folders (`from_pretrained`), peft adapters. Each entry point gathers its
arguments, builds one plan, and hands it to the loader and the runtime."""
