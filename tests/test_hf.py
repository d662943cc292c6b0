"""bigload.integrations.hf.from_pretrained against transformers' own from_pretrained, architecture by architecture.

Each architecture is a tiny random model saved with `save_pretrained` as real shards (tests/fixtures_hf.py).
bigload loads it (everything on the CPU, or with a budget that sends some blocks to disk) and its outputs and
greedy tokens must equal those of transformers' in-memory model of the same class: bit for bit, since the
arithmetic is the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bigload.integrations import hf  # noqa: E402
from bigload.formats.mapped import CheckpointReader  # noqa: E402
from bigload.formats.discover import open_checkpoint
from bigload.errors import BigloadError, CheckpointError, PlanError  # noqa: E402
from bigload.runtime import OutputAlignment, detach, runtime_of  # noqa: E402
from bigload.plan.headers import inventory_from_checkpoint  # noqa: E402
from bigload.plan.inventory import inventory_from_module
from bigload.load.sources import DerivedTensor  # noqa: E402

from fixtures_hf import ARCHS, PROMPT, Arch, build_model, checkpoint_bytes, edit_config, write_model  # noqa: E402

GENERATIVE = [name for name, arch in ARCHS.items() if arch.generative]
# The fraction of the checkpoint's bytes given to the CPU, tried in turn until a plan keeps some blocks on
# the CPU and sends others to disk (how much the planner reserves for offloaded blocks differs by model).
CPU_FRACTIONS = (0.8, 0.9, 0.7, 0.6)
NEW_TOKENS = 8


# --------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The model folder of an architecture, written once per module."""
    folders: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in folders:
            folders[name] = write_model(ARCHS[name], tmp_path_factory.mktemp(name) / "model")
        return folders[name]

    return get


@pytest.fixture(scope="module")
def reference(saved: Callable[[str], Path]) -> Callable[..., Any]:
    """transformers' own from_pretrained of an architecture's folder (the config's class, or another)."""
    models: dict[tuple[str, str], Any] = {}

    def get(name: str, model_class: Any = None) -> Any:
        cls = model_class or getattr(transformers, ARCHS[name].architectures or ARCHS[name].saved_as)
        key = (name, cls.__name__)
        if key not in models:
            models[key] = cls.from_pretrained(saved(name)).eval()
        return models[key]

    return get


def _ids() -> torch.Tensor:
    return torch.tensor(PROMPT)


def outputs(model: Any, arch: Arch) -> dict[str, torch.Tensor]:
    """The tensors a forward returns that depend on every weight."""
    ids = _ids()
    with torch.no_grad():
        if arch.kind == "seq2seq":
            out = model(input_ids=ids, decoder_input_ids=ids[:, :4])
        else:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    found = {key: getattr(out, key, None) for key in ("logits", "last_hidden_state", "pooler_output")}
    return {key: value for key, value in found.items() if value is not None}


def assert_same_outputs(model: Any, ref: Any, arch: Arch) -> None:
    got, want = outputs(model, arch), outputs(ref, arch)
    assert got.keys() == want.keys() and got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=f"{arch.name}: {key} differs")


def greedy(model: Any) -> list[list[int]]:
    ids = _ids()
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              do_sample=False).tolist()


def assert_nothing_on_meta(model: Any) -> None:
    on_meta = [name for name, tensor in [*model.named_parameters(remove_duplicate=False),
                                         *model.named_buffers(remove_duplicate=False)]
               if tensor.device.type == "meta"]
    assert on_meta == []


def load_offloaded(folder: Path, offload: Path, **kwargs: Any) -> Any:
    """from_pretrained with a CPU budget that keeps some blocks on the CPU and sends the others to disk."""
    size = checkpoint_bytes(folder)
    if kwargs.get("dtype") in (torch.float16, torch.bfloat16):
        size //= 2  # the fixtures are saved in float32
    for fraction in CPU_FRACTIONS:
        try:
            model = hf.from_pretrained(folder, max_memory={"cpu": int(size * fraction), "disk": "1GiB"},
                                       offload_folder=offload, progress=False, **kwargs)
        except PlanError:
            continue
        places = set(model.hf_device_map.values())
        if places == {"cpu", "disk"}:
            return model
        detach(model)
    raise AssertionError(f"no CPU budget in {CPU_FRACTIONS} of {size} bytes splits {folder} between cpu and disk")


def _model_class(arch: Arch) -> Any:
    """The class to load with: the config's, except BERT, loaded as the base model encoders are used as (its
    masked-LM class, which the Hub's checkpoint layout does not fit strictly, has its own test)."""
    return transformers.AutoModel if arch.kind == "encoder" else None


# --------------------------------------------------------------------------------------------------
# every architecture: CPU, disk offload, generate


@pytest.mark.parametrize("name", list(ARCHS))
def test_everything_on_cpu_equals_transformers(name: str, saved: Callable[[str], Path],
                                               reference: Callable[..., Any]) -> None:
    arch = ARCHS[name]
    model = hf.from_pretrained(saved(name), model_class=_model_class(arch), progress=False)
    ref = reference(name, _model_class(arch))
    assert type(model) is type(ref)
    assert model.hf_device_map == {"": "cpu"}
    assert_nothing_on_meta(model)
    assert not model.training
    # Tied weights stay one tensor (GPT-2's wte/lm_head, T5's shared embeddings, Qwen2's tie_word_embeddings).
    model_ties = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()}
    ref_ties = {name for name, _ in ref.named_parameters(remove_duplicate=False)} - {
        name for name, _ in ref.named_parameters()}
    assert model_ties == ref_ties
    assert_same_outputs(model, ref, arch)


def test_materialized_weights_are_private_memory_and_equal(saved: Callable[[str], Path],
                                                            reference: Callable[..., Any]) -> None:
    from fixtures_ckpt import mapped_file_of

    arch = ARCHS["llama"]
    model = hf.from_pretrained(saved("llama"), model_class=_model_class(arch), progress=False, materialize=True)
    backing = {mapped_file_of(p.data_ptr()) for p in model.parameters()}
    assert not {b for b in backing if b is not None and b.endswith(".safetensors")}
    assert_same_outputs(model, reference("llama", _model_class(arch)), arch)


@pytest.mark.parametrize("name", list(ARCHS))
def test_disk_offload_equals_transformers(name: str, saved: Callable[[str], Path], reference: Callable[..., Any],
                                          tmp_path: Path) -> None:
    arch = ARCHS[name]
    model = load_offloaded(saved(name), tmp_path / "offload", model_class=_model_class(arch))
    ref = reference(name, _model_class(arch))
    store = json.loads((tmp_path / "offload" / "index.json").read_text())
    assert store, "the plan sends blocks to disk, so the offload folder holds their weights"
    assert_same_outputs(model, ref, arch)
    assert runtime_of(model).stats().bytes_loaded > 0
    # Detached, the weights come back from disk: nothing was left on meta.
    detach(model)
    assert_nothing_on_meta(model)
    assert_same_outputs(model, ref, arch)


@pytest.mark.parametrize("where", ["cpu", "disk"])
@pytest.mark.parametrize("name", GENERATIVE)
def test_greedy_generate_equals_transformers(name: str, where: str, saved: Callable[[str], Path],
                                             reference: Callable[..., Any], tmp_path: Path) -> None:
    folder = saved(name)
    if where == "cpu":
        model = hf.from_pretrained(folder, progress=False)
    else:
        model = load_offloaded(folder, tmp_path / "offload")
    want = greedy(reference(name))
    assert len(set(want[0][-NEW_TOKENS:])) > 1, "the fixture's weights should not repeat one token"
    assert greedy(model) == want


# --------------------------------------------------------------------------------------------------
# encoder-decoders: transformers reaches for accelerate's `_hf_hook` on the encoder


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_generate_needs_no_accelerate(name: str, saved: Callable[[str], Path],
                                                      reference: Callable[..., Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.generation.utils as generation_utils

    # Without accelerate, transformers has no add_hook_to_module: finding no `_hf_hook` on the encoder of a
    # model with `hf_device_map`, it would fail with a NameError.
    monkeypatch.delattr(generation_utils, "add_hook_to_module", raising=False)
    model = load_offloaded(saved(name), tmp_path / "offload")
    encoder = model.get_encoder()
    assert isinstance(encoder._hf_hook, OutputAlignment)
    assert greedy(model) == greedy(reference(name))
    assert encoder._hf_hook.io_same_device  # set by generate, as for accelerate's hook
    assert not hasattr(encoder, "_old_forward")  # accelerate's add_hook_to_module never wrapped it
    detach(model)
    assert "_hf_hook" not in encoder.__dict__
    assert not encoder._forward_hooks and not encoder._forward_pre_hooks


class _ComputesElsewhere(torch.nn.Module):
    """Returns its result on the CPU whatever device its input is on, as a module whose last block runs on
    another device does."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": torch.ones(2), "past_key_values": torch.ones(1)}


def test_output_alignment_returns_outputs_to_the_input_device() -> None:
    module = _ComputesElsewhere()
    alignment = OutputAlignment(module)
    caller_input = torch.empty(2, device="meta")  # the only other device a CPU-only machine has
    assert module(caller_input)["hidden"].device.type == "cpu"  # io_same_device unset: left where it is
    alignment.io_same_device = True  # what transformers' generate sets on an encoder's `_hf_hook`
    out = module(caller_input)
    assert out["hidden"].device.type == "meta"
    assert out["past_key_values"].device.type == "cpu"  # caches never move
    alignment.remove()
    assert module(caller_input)["hidden"].device.type == "cpu"


# --------------------------------------------------------------------------------------------------
# Mixtral: per-expert checkpoint tensors, fused model tensors


def test_mixtral_checkpoint_holds_experts_the_model_fuses(saved: Callable[[str], Path]) -> None:
    folder = saved("mixtral")
    index = open_checkpoint(folder)
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in index.tensors
    model = hf.meta_model_from_config(hf.load_config(folder))
    names = dict(model.named_parameters())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    plan = hf.checkpoint_sources(model, index)
    fused = plan.tensors["model.layers.0.mlp.experts.gate_up_proj"]
    assert isinstance(fused, DerivedTensor)
    assert fused.shape == tuple(names["model.layers.0.mlp.experts.gate_up_proj"].shape)
    # Every expert's w1 (gate) and w3 (up), experts in numeric order (2 before 10).
    assert sorted(ref.name.split("block_sparse_moe.experts.")[1] for ref in fused.parts) == sorted(
        f"{expert}.{w}.weight" for w in ("w1", "w3") for expert in range(4))
    assert [ref.name for ref in fused.parts if ".w1." in ref.name] == [
        f"model.layers.0.block_sparse_moe.experts.{expert}.w1.weight" for expert in range(4)]
    down = plan.tensors["model.layers.0.mlp.experts.down_proj"]
    assert isinstance(down, DerivedTensor) and len(down.parts) == 4
    router = plan.tensors["model.layers.0.mlp.gate.weight"]
    assert router.name == "model.layers.0.block_sparse_moe.gate.weight"  # renamed, read as is
    assert "model.embed_tokens.weight" not in plan.tensors  # same name: matched as it is


def test_mixtral_fused_experts_are_built_as_transformers_builds_them(saved: Callable[[str], Path],
                                                                     reference: Callable[..., Any]) -> None:
    folder = saved("mixtral")
    index = open_checkpoint(folder)
    plan = hf.checkpoint_sources(hf.meta_model_from_config(hf.load_config(folder)), index)
    ref = reference("mixtral")
    with CheckpointReader(index) as reader:
        for name in ("model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj"):
            derived = plan.tensors[name]
            built = derived.build([reader.read(part) for part in derived.parts])
            assert torch.equal(built, ref.get_parameter(name))


def test_mixtral_fused_experts_go_to_disk(saved: Callable[[str], Path], reference: Callable[..., Any],
                                          tmp_path: Path) -> None:
    model = load_offloaded(saved("mixtral"), tmp_path / "offload")
    disk_layers = [key for key, where in model.hf_device_map.items() if where == "disk" and ".layers." in key]
    assert disk_layers
    store = json.loads((tmp_path / "offload" / "index.json").read_text())
    assert f"{disk_layers[0]}.mlp.experts.gate_up_proj" in store
    detach(model)  # reads the disk blocks back
    fused = f"{disk_layers[0]}.mlp.experts.gate_up_proj"
    assert torch.equal(model.get_parameter(fused), reference("mixtral").get_parameter(fused))


def test_mixtral_plans_from_headers_alone(saved: Callable[[str], Path], reference: Callable[..., Any],
                                          tmp_path: Path) -> None:
    folder = saved("mixtral")
    from_headers = inventory_from_checkpoint(open_checkpoint(folder))
    from_model = inventory_from_module(hf.meta_model_from_config(hf.load_config(folder)))
    # The same weights either way (the model adds only computed buffers: rotary inv_freq).
    weights = sum(entry.nbytes for entry in from_model.tensors if not entry.buffer)
    assert from_headers.total_bytes == weights
    # A plan made from the checkpoint alone (per-expert names) places the fused model: its blocks are the
    # decoder layers either way.
    budget = {"cpu": int(checkpoint_bytes(folder) * 0.8), "disk": "1GiB"}
    only_weights = tmp_path / "weights"
    only_weights.mkdir()
    for path in folder.iterdir():
        if path.name != "config.json":
            (only_weights / path.name).symlink_to(path)
    plan = hf.plan_model(only_weights, max_memory=budget)
    assert "disk" in plan.device_map.values()
    # The map as `bigload plan --output map.json` writes it. Headers know nothing of computed buffers (the
    # rotary embedding's inv_freq): their module joins the map on the CPU.
    device_map = json.loads(json.dumps(plan.device_map))
    model = hf.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path / "offload",
                               progress=False)
    assert model.hf_device_map == {**plan.device_map, "model.rotary_emb": "cpu"}
    assert_same_outputs(model, reference("mixtral"), ARCHS["mixtral"])


class _MetaHostileOp:
    """A conversion op that needs real values, so it cannot be planned on meta tensors."""

    def convert(self, input_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        tensors = next(iter(input_dict.values()))
        scale = float(tensors[0].abs().max())  # reading a value: impossible on meta
        return {"experts.down_proj": torch.stack(tensors) * scale}

    def __repr__(self) -> str:
        return "ScaleByMax"


def test_unplannable_conversion_is_a_checkpoint_error(saved: Callable[[str], Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.core_model_loading import WeightConverter

    folder = saved("mixtral")
    model = hf.meta_model_from_config(hf.load_config(folder))
    from bigload.integrations.hf import conversion

    renamings, _ = conversion._conversion_mapping(model)
    converter = WeightConverter(".experts.*.w2.weight", ".experts.down_proj", operations=[_MetaHostileOp()])
    monkeypatch.setattr(conversion, "_conversion_mapping", lambda model: (renamings, [converter]))
    with pytest.raises(CheckpointError, match=r"experts\.down_proj.*ScaleByMax.*from_pretrained"):
        hf.checkpoint_sources(model, open_checkpoint(folder))


# --------------------------------------------------------------------------------------------------
# names: base-model prefixes, heads, stale buffers


def test_gpt2_checkpoint_in_the_hubs_layout(tmp_path: Path, reference: Callable[..., Any]) -> None:
    """The Hub's gpt2 checkpoint: GPT2Model's names (no `transformer.` prefix), no lm_head (tied to wte), and
    the causal-mask buffers `h.N.attn.bias` old transformers saved, which the model no longer has."""
    arch = ARCHS["gpt2"]
    ref = build_model(arch)
    folder = tmp_path / "gpt2"
    ref.save_pretrained(folder)
    for path in folder.glob("model*.safetensors*"):
        path.unlink()
    tensors = {name: tensor.contiguous() for name, tensor in ref.transformer.state_dict().items()}
    for layer in range(ref.config.n_layer):
        tensors[f"h.{layer}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    model = hf.from_pretrained(folder, progress=False)  # strict
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_nothing_on_meta(model)
    expected = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert_same_outputs(model, expected, arch)
    assert greedy(model) == greedy(expected)


def test_bert_head_checkpoint_as_base_model_ignores_the_heads(saved: Callable[[str], Path]) -> None:
    index = open_checkpoint(saved("bert"))
    base = hf.meta_model_from_config(hf.load_config(saved("bert")), model_class=transformers.AutoModel)
    plan = hf.checkpoint_sources(base, index)
    # BertModel: the checkpoint's `bert.` prefix is stripped; both heads (`cls.*`) are not used.
    assert type(base).__name__ == "BertModel"
    assert plan.ignored == {name for name in index.tensors if name.startswith("cls.")}
    assert plan.tensors["pooler.dense.weight"].name == "bert.pooler.dense.weight"


def test_bert_masked_lm_from_a_pretraining_checkpoint(saved: Callable[[str], Path], reference: Callable[..., Any],
                                                      tmp_path: Path) -> None:
    """The Hub's BERT layout names BertForMaskedLM but holds BertForPreTraining's weights: the pooler and the
    next-sentence head are unexpected for the masked-LM model. strict says so; strict=False loads the rest."""
    folder = saved("bert")
    with pytest.raises(CheckpointError, match=r"unexpected: .*bert\.pooler\.dense\.weight.*strict=False"):
        hf.from_pretrained(folder, progress=False)
    model = hf.from_pretrained(folder, strict=False, progress=False)
    assert type(model).__name__ == "BertForMaskedLM"
    assert_nothing_on_meta(model)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert_same_outputs(model, reference("bert"), ARCHS["bert"])
    offloaded = load_offloaded(folder, tmp_path / "offload", strict=False)
    assert_same_outputs(offloaded, reference("bert"), ARCHS["bert"])


# --------------------------------------------------------------------------------------------------
# dtypes, as transformers 5 chooses them


@pytest.mark.parametrize("config_names_dtype", [True, False], ids=["config-dtype", "checkpoint-dtype"])
def test_default_dtype_is_transformers(config_names_dtype: bool, tmp_path: Path) -> None:
    """No dtype given: the config's `dtype`, else the checkpoint's first floating tensor's (never float32 by
    default, as transformers 4 did)."""
    folder = write_model(ARCHS["llama"], tmp_path / "llama", dtype=torch.bfloat16)
    if not config_names_dtype:
        edit_config(folder, dtype=None, torch_dtype=None)
    expected = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model = hf.from_pretrained(folder, progress=False)
    assert {p.dtype for p in model.parameters()} == {p.dtype for p in expected.parameters()} == {torch.bfloat16}
    assert_same_outputs(model, expected, ARCHS["llama"])


def test_float16_keeps_transformers_fp32_modules(saved: Callable[[str], Path], tmp_path: Path) -> None:
    """T5 at float16 keeps its `wo` projections in float32 (`_keep_in_fp32_modules`), as transformers does."""
    folder = saved("t5")
    expected = transformers.T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float16).eval()
    for load in (lambda: hf.from_pretrained(folder, dtype=torch.float16, progress=False),
                 lambda: load_offloaded(folder, tmp_path / "offload", dtype=torch.float16)):
        model = load()
        detach(model)
        dtypes = {name: p.dtype for name, p in model.named_parameters()}
        assert dtypes == {name: p.dtype for name, p in expected.named_parameters()}
        assert dtypes["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == torch.float32
        assert dtypes["encoder.block.0.layer.1.DenseReluDense.wi.weight"] == torch.float16
        assert_same_outputs(model, expected, ARCHS["t5"])


def test_tokenizer_is_loaded_from_the_folder(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    tokenizer = hf.load_tokenizer(tmp_path)
    assert tokenizer("hello world")["input_ids"] == [1, 2]
    with pytest.raises(BigloadError, match="missing: no such folder"):  # the path is checked first
        hf.load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BigloadError, match="no tokenizer could be loaded"):
        hf.load_tokenizer(tmp_path / "empty")
