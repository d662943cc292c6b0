import os
import subprocess
import sys
import textwrap

import torch
from torch import nn

from bigload.empty import init_empty_weights, init_on_device


class TiedModel(nn.Module):
    """lm_head tied to the embedding in __init__, the way transformers models tie."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.body = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 100, bias=False)
        self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), persistent=False)


def test_parameters_go_to_meta_and_stay_parameters():
    with init_empty_weights():
        model = TiedModel()
    for name, param in model.named_parameters():
        assert param.device.type == "meta", name
        assert isinstance(param, nn.Parameter)
        assert param.requires_grad
    assert model.body.weight.shape == (16, 16)


def test_weights_tied_in_init_stay_one_parameter():
    with init_empty_weights():
        model = TiedModel()
    assert model.lm_head.weight is model.embed.weight
    assert len(list(model.parameters())) == 3  # embed (shared), body.weight, body.bias


def test_buffers_keep_their_values_unless_included():
    with init_empty_weights():
        model = TiedModel()
    assert model.inv_freq.device.type == "cpu"
    torch.testing.assert_close(model.inv_freq, torch.tensor([1.0, 0.1, 0.01, 0.001]))
    with init_empty_weights(include_buffers=True):
        model = TiedModel()
    assert model.inv_freq.device.type == "meta"
    assert model.lm_head.weight is model.embed.weight


def test_hooks_are_removed_after_the_block():
    with init_empty_weights(include_buffers=True):
        pass
    layer = nn.Linear(2, 2)
    assert layer.weight.device.type == "cpu"
    assert torch.empty(3).device.type == "cpu"


def test_init_on_device_cpu_keeps_real_weights():
    with init_on_device("cpu"):
        layer = nn.Linear(3, 3)
    assert layer.weight.device.type == "cpu"


def test_transformers_tied_llama_stays_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True,
    )
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"


def test_400b_parameter_model_builds_in_seconds_and_allocates_nothing():
    # A fresh process so the measured resident memory belongs to this build alone.
    script = textwrap.dedent(
        """
        import resource, time, torch
        from torch import nn
        from bigload.empty import init_empty_weights

        def rss_kib():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))

        before = rss_kib()
        start = time.perf_counter()
        with init_empty_weights():
            # 100 layers of 4 x (16384 x 61440): 402.7e9 parameters, 1.6 TB in fp32.
            model = nn.Sequential(*[
                nn.Sequential(nn.Linear(16384, 61440, bias=False), nn.Linear(61440, 16384, bias=False),
                              nn.Linear(16384, 61440, bias=False), nn.Linear(61440, 16384, bias=False))
                for _ in range(100)
            ])
        elapsed = time.perf_counter() - start
        count = sum(p.numel() for p in model.parameters())
        print(count, elapsed, rss_kib() - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    count, elapsed, grown_kib = out.stdout.split()
    assert int(count) > 400e9
    assert float(elapsed) < 10.0
    assert int(grown_kib) < 50 * 1024  # well under 1e-4 of the 1.6 TB the weights would take


def test_initializers_skip_meta_tensors_and_still_run_on_real_ones():
    calls = []

    class Recording(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    for include_buffers in (False, True):
        calls.clear()
        # Entered first, so it sees only what init_empty_weights' own mode passes on to torch.
        with Recording(), init_empty_weights(include_buffers=include_buffers):
            layer = nn.Linear(8, 8)
            assert nn.init.normal_(layer.weight) is layer.weight
            layer.bias.data.zero_()
            real = torch.zeros(4, device="cpu")
            nn.init.uniform_(real, 1.0, 2.0)
        assert layer.weight.is_meta
        assert bool((real >= 1.0).all()), "an initializer on a real tensor must still run"
        names = [getattr(func, "__name__", "") for func in calls]
        assert "uniform_" in names  # the real tensor's
        assert "normal_" not in names and "zero_" not in names, names
