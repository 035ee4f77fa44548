"""KV-cached generation equals the uncached path; int8 generation stays close to fp32."""

from __future__ import annotations

import shutil

import pytest
import torch

from diygpt.checkpoints import save_run
from diygpt.cli.main import main
from diygpt.config import get_preset
from diygpt.errors import GenerationError
from diygpt.generation import generate
from diygpt.losses import calc_loss_batch
from diygpt.model import GPTModel
from diygpt.quantize import Int8Linear, model_bytes, quantize_int8, quantize_rows

CFG = get_preset("tiny").with_updates(vocab_size=300, context_length=16, qkv_bias=True)


def _model(attn: str = "sdpa", device: str = "cpu") -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(CFG.with_updates(attn_impl=attn)).to(device).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("new_tokens", [5, 40])  # 40 > context 16: the window slides
def test_cached_greedy_equals_uncached(attn, new_tokens, device):
    model = _model(attn, device)
    idx = torch.randint(0, CFG.vocab_size, (2, 4), device=device)
    cached = generate(model, idx, new_tokens, CFG.context_length, use_cache=True)
    uncached = generate(model, idx, new_tokens, CFG.context_length, use_cache=False)
    assert torch.equal(cached, uncached)


def test_quantize_rows_round_trip_error_is_within_half_a_step():
    w = torch.randn(8, 32)
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("kernels", ["", "AVX2"])
def test_int8_layer_is_right_on_cpus_without_vnni(kernels):
    # fbgemm's AVX2 kernels sum pairs of u8 x s8 products in int16: with 8-bit activations
    # near 255 and weights near 127 that overflows (14% off before reduce_range)
    import os
    import subprocess
    import sys

    script = (
        "import torch; from torch import nn; from diygpt.quantize import Int8Linear\n"
        "lin = nn.Linear(64, 4)\n"
        "with torch.no_grad(): lin.weight.fill_(1.0); lin.bias.zero_()\n"
        "x = torch.rand(3, 64, generator=torch.Generator().manual_seed(0))\n"
        "ref = lin(x); out = Int8Linear(lin)(x)\n"
        "print(((out - ref).abs() / ref.abs()).max().item())\n"
    )
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS=kernels)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert float(done.stdout.split()[-1]) < 0.005


def test_int8_model_is_smaller_and_its_loss_is_close():
    model = _model()
    idx = torch.randint(0, CFG.vocab_size, (2, 17))
    with torch.no_grad():
        before = calc_loss_batch(idx[:, :-1], idx[:, 1:], model, "cpu").item()
        size = model_bytes(model)
        quantize_int8(model)
        after = calc_loss_batch(idx[:, :-1], idx[:, 1:], model, "cpu").item()
    assert isinstance(model.out_head, Int8Linear)
    assert isinstance(model.trf_blocks[0].att.W_query, Int8Linear)
    assert model_bytes(model) < size
    assert after == pytest.approx(before, rel=0.02)
    out = generate(model, idx[:, :4], 20, CFG.context_length)
    assert out.shape == (2, 24)


def test_int8_of_a_padded_or_fused_model_is_the_int8_of_the_plain_one():
    from diygpt.speed import fuse_qkv, pad_vocab

    idx = torch.randint(0, CFG.vocab_size, (2, 5))
    with torch.no_grad():
        plain = quantize_int8(_model())(idx)
        padded = quantize_int8(pad_vocab(_model()))(idx)  # not 320 logits, 20 of them zero
        fused = quantize_int8(fuse_qkv(_model()))(idx)  # int8 weights cannot be stacked
    assert plain.shape[-1] == CFG.vocab_size
    assert torch.equal(padded, plain) and torch.equal(fused, plain)


def test_generate_cli_int8(tmp_path, capsys):
    torch.manual_seed(0)
    save_run(tmp_path, GPTModel(get_preset("tiny")), None, {})
    argv = ["generate", "--checkpoint", str(tmp_path), "--prompt", "Every effort moves you",
            "--max-new-tokens", "5", "--device", "cpu"]
    assert main([*argv, "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_cache_greedy_equals_generate(attn, device):
    from diygpt.static_decode import static_generate

    model = _model(attn, device)
    idx = torch.randint(0, CFG.vocab_size, (2, 3), device=device)
    expected = generate(model, idx, 13, CFG.context_length)  # fills the 16-token window
    assert torch.equal(static_generate(model, idx, 13), expected)
    model.train()
    assert torch.equal(static_generate(model, idx.to(torch.int16), 13), expected)
    assert model.training  # left as it was found
    with pytest.raises(GenerationError, match="max_new_tokens >= 0"):
        static_generate(model, idx, -1)


def test_static_decode_compile_settings_per_device(monkeypatch):
    from diygpt import static_decode
    from diygpt.errors import GenerationError

    seen = {}

    def fake_compile(fn, **kwargs):
        seen[len(seen)] = kwargs
        return fn

    monkeypatch.setattr(static_decode.torch, "compile", fake_compile)
    static_decode.compiled_step.cache_clear()
    try:
        static_decode.compiled_step("cuda")
        static_decode.compiled_step("cpu")
        model = _model()
        idx = torch.randint(0, CFG.vocab_size, (1, 4))
        out = static_decode.static_generate(model, idx, 5, compile=True)
    finally:
        static_decode.compiled_step.cache_clear()
    assert seen[0] == {"mode": "reduce-overhead", "fullgraph": True}  # CUDA graphs
    cpu = seen[1]
    assert cpu["fullgraph"] and cpu["dynamic"] is False
    # every one-row matmul, the 50257-wide output head included, becomes a fused reduction
    limit = cpu["options"]["post_grad_fusion_options"]["decompose_mm_pass"]
    assert limit["cpu_max_other_dimension_decomposition"] >= 50257
    assert torch.equal(out, generate(model, idx, 5, CFG.context_length))
    with pytest.raises(GenerationError):
        static_decode.static_generate(model, idx, 20)  # 24 tokens > window 16


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_equals_generate_also_past_the_window():
    model = _model()
    idx = torch.randint(0, CFG.vocab_size, (2, 3))
    expected = generate(model, idx, 20, CFG.context_length)  # 23 tokens > window 16
    # the same tokens through the real torch.compile: static cache, then the sliding fallback
    assert torch.equal(generate(model, idx, 20, CFG.context_length, compile=True), expected)

    from torch._dynamo.utils import counters
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    counters.clear()
    # batch 1, compiled afresh (no on-disk cache hit) so that the graph passes run and count:
    # every linear of the step (6 per block, the head) becomes a fused reduction, not a gemv
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        one = generate(model, idx[:1], 5, CFG.context_length, compile=True)
    assert torch.equal(one, generate(model, idx[:1], 5, CFG.context_length))
    decomposed = counters["inductor"]["decompose_mm"] + counters["inductor"]["decompose_addmm"]
    assert decomposed == 6 * CFG.n_layers + 1

    from diygpt.static_decode import StaticDecoder

    with torch.no_grad():
        decoder = StaticDecoder(model, 2, CFG.context_length)
        decoder.prefill(idx)
        stepped = decoder.step(expected[:, 3:4])
        direct = model(expected[:, :4])[:, -1]
    assert torch.allclose(stepped, direct, atol=1e-5)


def test_past_torchs_recompile_limit_decoding_goes_on_uncompiled(monkeypatch):
    # One compiled step serves the process; a 9th (batch, cache length) makes dynamo refuse.
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from diygpt import static_decode

    def refused(*args):
        raise FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

    monkeypatch.setattr(static_decode, "_PAST_RECOMPILE_LIMIT", set())
    monkeypatch.setattr(static_decode, "compiled_step", lambda device_type: refused)
    model = _model()
    idx = torch.randint(0, CFG.vocab_size, (2, 3))
    expected = generate(model, idx, 20, CFG.context_length)
    with pytest.warns(UserWarning, match="recompile limit"):
        assert torch.equal(generate(model, idx, 20, CFG.context_length, compile=True), expected)
    assert static_decode._PAST_RECOMPILE_LIMIT == {"cpu"}
    decoder = static_decode.StaticDecoder(model, 1, CFG.context_length, compile=True)
    assert decoder.step_fn is static_decode.static_forward  # later decoders skip the refusal


def test_generate_cli_compile_flag(tmp_path, capsys, monkeypatch):
    from diygpt import static_decode

    calls = []
    monkeypatch.setattr(static_decode, "compiled_step", lambda kind: calls.append(kind)
                        or static_decode.static_forward)
    torch.manual_seed(0)
    save_run(tmp_path, GPTModel(get_preset("tiny")), None, {})
    argv = ["generate", "--checkpoint", str(tmp_path), "--prompt", "Every effort moves you",
            "--max-new-tokens", "5", "--device", "cpu"]
    assert main([*argv, "--compile"]) == 0
    assert calls == ["cpu"]
    assert capsys.readouterr().out.startswith("Every effort moves you")
    assert main([*argv, "--compile", "--no-cache"]) == 2
    assert "--compile" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_int8_decode_keeps_the_int8_kernel():
    model = quantize_int8(_model())
    idx = torch.randint(0, CFG.vocab_size, (1, 3))
    expected = generate(model, idx, 10, CFG.context_length)
    assert torch.equal(generate(model, idx, 10, CFG.context_length, compile=True), expected)


@pytest.mark.parametrize("prompt_len", [3, 6])  # read a token at a time, and in one pass
def test_cuda_tuning_keeps_the_logits_and_reuses_a_refreshed_cache(prompt_len, device,
                                                                   monkeypatch):
    """The CUDA speed-ups of static decoding (pooled cache, stacked q/k/v weights, attention
    written out, short prompts through the step), forced on here so that they run on the CPU
    too."""
    from diygpt import static_decode
    from diygpt.static_decode import StaticDecoder

    monkeypatch.setattr(static_decode, "STEP_PROMPT", 4)
    steps = []

    def step(*args):  # the uncompiled step stands in for the compiled one (see test_cuda.py)
        steps.append(1)
        return static_decode.static_forward(*args)

    monkeypatch.setattr(static_decode, "compiled_step", lambda kind: step)
    model = _model(device=device)
    idx = torch.randint(0, CFG.vocab_size, (2, prompt_len + 5), device=device)

    def decode(tuning: bool) -> tuple[StaticDecoder, torch.Tensor]:
        decoder = StaticDecoder(model, 2, CFG.context_length, cuda_tuning=tuning)
        with torch.no_grad():
            logits = [decoder.prefill(idx[:, :prompt_len])]
            logits += [decoder.step(idx[:, i : i + 1]) for i in range(prompt_len, idx.shape[1])]
        return decoder, torch.stack(logits)

    tuned, logits = decode(True)
    assert tuned.cache.qkv is not None and tuned.cache.plain_attention
    assert len(steps) == 5 + (prompt_len if prompt_len <= 4 else 0)  # 3: step by step
    torch.testing.assert_close(logits, decode(False)[1], atol=1e-5, rtol=1e-5)
    first = tuned.cache
    assert decode(True)[0].cache is not first  # still held by `tuned`: a fresh cache
    del tuned
    first.v[0].fill_(float("nan"))  # what a reused cache held must not leak into the next text
    with torch.no_grad():  # training moved the weights: the reused cache must follow
        for p in (model.trf_blocks[0].att.W_key.weight, model.trf_blocks[1].att.W_value.bias):
            p.add_(0.1 * torch.randn_like(p))
    again, logits = decode(True)
    assert again.cache is first
    torch.testing.assert_close(logits, decode(False)[1], atol=1e-5, rtol=1e-5)


def _broken_run(tmp_path, broken="final_norm.scale"):
    """A run folder whose weights hold NaN (as a diverged run saves them)."""
    torch.manual_seed(0)
    model = GPTModel(get_preset("tiny"))
    with torch.no_grad():
        model.get_parameter(broken).view(-1)[0] = float("nan")
    save_run(tmp_path, model, None, {})
    return model


@pytest.mark.parametrize("extra", [[], ["--temperature", "1", "--seed", "1"],
                                   ["--quantize", "int8"], ["--no-cache"]])
@pytest.mark.parametrize("broken", ["final_norm.scale", "trf_blocks.0.att.W_query.weight"])
def test_nan_weights_are_one_line_not_garbage(tmp_path, capsys, extra, broken):
    # Greedy printed "!!!!!" (argmax ranks NaN first), sampling turned greedy without a
    # word, int8 ended in fbgemm's traceback, and a NaN query weight never reached the
    # logits (CPU SDPA gives such rows zeros): quietly wrong text.
    from cli_helpers import one_line_error

    _broken_run(tmp_path, broken)
    line = one_line_error(capsys, "generate", "--checkpoint", tmp_path, "--prompt", "Every",
                          "--max-new-tokens", "3", "--device", "cpu", *extra)
    assert f"weight {broken} holds NaN" in line and "broken" in line


def test_nan_weights_refuse_quantization_and_eval_says_so(tmp_path, capsys, verdict_path):
    from cli_helpers import one_line_error

    model = _broken_run(tmp_path)
    with torch.no_grad():
        model.out_head.weight[0, 0] = float("nan")
    with pytest.raises(GenerationError, match="cannot quantize"):
        quantize_int8(model)
    line = one_line_error(capsys, "eval", "--checkpoint", tmp_path, "--data", verdict_path,
                          "--max-batches", "1", "--device", "cpu")
    assert "weight final_norm.scale holds NaN" in line


def test_nan_logits_from_finite_weights_are_one_line(tmp_path, capsys, verdict_path):
    # Finite weights whose activations overflow: the per-step check still catches them.
    from cli_helpers import one_line_error

    model = _model()
    with torch.no_grad():
        model.trf_blocks[0].ff.layers[0].weight.fill_(3e38)
    with pytest.raises(GenerationError, match="logits are NaN"):
        generate(model, torch.tensor([[1, 2]]), 3, CFG.context_length)
    torch.manual_seed(0)
    model = GPTModel(get_preset("tiny"))
    with torch.no_grad():
        model.trf_blocks[0].ff.layers[0].weight.fill_(3e38)
    save_run(tmp_path, model, None, {})
    line = one_line_error(capsys, "eval", "--checkpoint", tmp_path, "--data", verdict_path,
                          "--max-batches", "1", "--device", "cpu")
    assert "the model's loss is NaN" in line


def test_int8_layers_keep_a_half_precision_models_dtype_and_survive_a_copy():
    import copy
    import gc

    idx = torch.randint(0, CFG.vocab_size, (1, 5))
    half = quantize_int8(_model().to(torch.bfloat16))  # the fp32 bias made the output fp32
    assert half(idx).dtype == torch.bfloat16
    original = quantize_int8(_model())
    expected = original(idx)
    seen = []
    original.out_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    twin = copy.deepcopy(original)
    del original  # the copy looked its packed weights up under the original's name
    gc.collect()
    torch.testing.assert_close(twin(idx), expected, rtol=0, atol=0)
    assert seen == [(1, 5, CFG.vocab_size)]  # hooks copied with the layer, as nn.Module's are
    assert isinstance(twin.out_head, Int8Linear) and twin.out_head.weight.dtype == torch.int8


def test_a_half_precision_checkpoint_is_quantized_from_fp32_and_gpus_are_refused(
        tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    half = GPTModel(get_preset("tiny")).to(torch.bfloat16)
    save_run(tmp_path / "half", half, None, {})
    save_run(tmp_path / "full", half.float(), None, {})  # the same values, stored in fp32
    outputs = []
    for name in ("half", "full"):
        argv = ["generate", "--checkpoint", str(tmp_path / name), "--prompt", "Every",
                "--max-new-tokens", "8", "--device", "cpu", "--quantize", "int8"]
        assert main(argv) == 0, capsys.readouterr().err
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # bf16 activations would skip fbgemm and part from fp32
    monkeypatch.setattr("diygpt.device.select_device", lambda name: torch.device("cuda"))
    assert main(["generate", "--checkpoint", str(tmp_path / "full"), "--quantize", "int8",
                 "--prompt", "x"]) == 2
    assert "--quantize int8 is for the CPU, not cuda: add --device cpu" in capsys.readouterr().err


def test_a_quantized_model_is_not_saved(tmp_path):
    from diygpt.checkpoints import save_weights
    from diygpt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="an int8-quantized model cannot be saved"):
        save_weights(quantize_int8(_model()), tmp_path / "q.safetensors")
    with pytest.raises(CheckpointError, match="cannot be saved"):
        save_run(tmp_path / "run", quantize_int8(_model()), None, {})
    assert not (tmp_path / "q.safetensors").exists()
