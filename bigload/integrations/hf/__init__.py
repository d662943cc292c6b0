"""transformers glue: model folders and configs (`models`), checkpoint names as transformers maps them
(`conversion`), and folders planned and loaded (`pretrained`)."""

from bigload.integrations.hf.conversion import checkpoint_sources, model_tensor_names
from bigload.integrations.hf.models import (
    ModelSource,
    config_dtype,
    load_config,
    load_tokenizer,
    meta_model_from_config,
    require_model_folder,
    resolve_model_source,
    without_transformers_progress,
)
from bigload.integrations.hf.pretrained import (
    describe_adapters,
    from_pretrained,
    inventory_for,
    load_generation_config,
    meta_model_for_folder,
    plan_model,
    prepare_model,
)

__all__ = ["ModelSource", "checkpoint_sources", "config_dtype", "describe_adapters", "from_pretrained",
           "inventory_for", "load_config", "load_generation_config", "load_tokenizer", "meta_model_for_folder",
           "meta_model_from_config", "model_tensor_names", "plan_model", "prepare_model", "require_model_folder",
           "resolve_model_source", "without_transformers_progress"]
