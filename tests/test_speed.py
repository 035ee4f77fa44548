"""Speed options on CPU: padded vocab, autocast/GradScaler, compile wiring, MFU, speed log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diygpt.checkpoints import load_model, save_run
from diygpt.cli.main import main
from diygpt.config import get_preset
from diygpt.model import GPTModel
from diygpt.precision import Precision
from diygpt.speed import SpeedMeter, flops_per_token, pad_vocab, padded_size, peak_flops

TINY = get_preset("tiny").with_updates(vocab_size=300, context_length=16)


def _model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(TINY).eval()


def test_padded_size():
    assert padded_size(50257) == 50304
    assert padded_size(64) == 64


def test_pad_vocab_keeps_logits_and_checkpoint_shape(tmp_path):
    model = _model()
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    before = model(idx)
    pad_vocab(model)
    assert model.out_head.weight.shape[0] == 320
    assert torch.equal(model(idx), before)  # (B, T, 300): same logits, real vocab only
    assert model.state_dict()["out_head.weight"].shape == (300, TINY.emb_dim)

    save_run(tmp_path, model, None, {})
    plain = load_model(tmp_path)  # an unpadded model loads the padded model's checkpoint
    assert torch.equal(plain(idx), before)
    again = pad_vocab(_model(seed=1))
    again.load_state_dict(plain.state_dict())  # and a padded model loads an unpadded one
    assert torch.equal(again(idx), before)


def test_pad_vocab_takes_no_draw_from_the_global_generator():
    # Else a padded run shuffles its data and draws its dropout masks off the unpadded run's.
    _model()
    unpadded_next = torch.rand(4)
    pad_vocab(_model())
    assert torch.equal(torch.rand(4), unpadded_next)


def test_padding_rows_get_no_gradient():
    model = pad_vocab(_model()).train()
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    model(idx).logsumexp(-1).mean().backward()
    grad = model.out_head.weight.grad
    assert grad[TINY.vocab_size:].abs().sum() == 0
    assert grad[: TINY.vocab_size].abs().sum() > 0


def _one_step(dtype: str, device: str) -> float:
    model = _model().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    precision = Precision(device, dtype)
    idx = torch.randint(0, TINY.vocab_size, (2, 9)).to(device)
    with precision.autocast():
        logits = model(idx[:, :-1])
    assert logits.dtype == (torch.float32 if dtype == "fp32" else precision.dtype)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten())
    precision.backward(loss)
    precision.unscale(opt)
    precision.step(opt)
    return loss.item()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_step_runs_and_is_close_to_fp32(dtype, device):
    assert _one_step(dtype, device) == pytest.approx(_one_step("fp32", device), rel=2e-3)


def test_fp16_uses_a_grad_scaler_and_fp32_none():
    assert Precision("cpu", "fp16").scaler is not None
    assert Precision("cpu", "fp32").scaler is None
    assert Precision("cpu", "fp32").is_default


def test_flops_per_token_of_gpt2_small():
    cfg = get_preset("gpt2-small")
    # 6 * (85M block weights + 38.6M head) + attention: about 0.85 GFLOP per token at ctx 1024.
    assert flops_per_token(cfg) == pytest.approx(6 * (12 * 12 * 768**2 + 50257 * 768)
                                                  + 12 * 12 * 768 * 1024)


def test_speed_meter_reports_and_resets():
    meter = SpeedMeter(flops_per_token=1e9, peak=1e12)
    meter.tokens, meter.seconds = 1000, 2.0
    assert meter.report() == ", 500 tok/s, MFU 50.0%"
    assert meter.tokens == 0
    assert SpeedMeter(1e9).mfu() is None


def _train(tmp_path, verdict_path, *extra: str, capsys, device: str = "cpu") -> list[str]:
    argv = [
        "train", "--data", str(verdict_path), "--preset", "tiny", "--max-steps", "4",
        "--eval-freq", "2", "--eval-iter", "1", "--batch-size", "2", "--no-progress",
        "--sample-prompt", "", "--device", device, "--out", str(tmp_path / "run"), *extra,
    ]
    assert main(argv) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("Ep ")]


def test_default_log_line_is_the_books(tmp_path, verdict_path, capsys):
    lines = _train(tmp_path, verdict_path, capsys=capsys)
    assert lines and all(line.endswith(tuple("0123456789")) and "tok/s" not in line
                         for line in lines)


def test_train_bf16_pad_vocab_fused_logs_tok_s_and_saves_book_shape(tmp_path, verdict_path, capsys,
                                                                    device):
    lines = _train(tmp_path, verdict_path, "--dtype", "bf16", "--pad-vocab", "--fused-adamw",
                   capsys=capsys, device=device)
    # MFU only where the GPU's peak is known (never on the CPU)
    suffix = ", MFU " if peak_flops(device) is not None else " tok/s"
    assert lines and all(re.search(r" tok/s(, MFU \d+\.\d%)?$", line) and suffix in line
                         for line in lines)
    model = load_model(tmp_path / "run")  # on the CPU, whatever device trained it
    assert model.out_head.weight.shape == (50257, 64)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["train_args"]["dtype"] == "bf16"


def test_train_compile_wiring(tmp_path, verdict_path, capsys, monkeypatch):
    """--compile wraps the model and the loss for the step and saves the model unwrapped
    (compile itself mocked)."""
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, fn, **options):
            super().__init__()
            self._orig_mod = fn

        def forward(self, *args, **kwargs):
            calls.append(getattr(self._orig_mod, "__name__", "model"))
            return self._orig_mod(*args, **kwargs)

    monkeypatch.setattr("diygpt.speed.torch.compile", Wrapper)
    _train(tmp_path, verdict_path, "--compile", capsys=capsys)
    # each training step: the compiled model, then the compiled loss on its logits
    assert calls.count("logsumexp_cross_entropy") == 4 and calls.count("model") >= 4
    assert "model.safetensors" in {p.name for p in (tmp_path / "run").iterdir()}
    load_model(tmp_path / "run")  # no _orig_mod. prefixes


@pytest.fixture
def compile_options(monkeypatch) -> list[dict]:
    """torch.compile mocked: each call's inductor options, in order; the function uncompiled."""
    seen: list[dict] = []
    monkeypatch.setattr("diygpt.speed.torch.compile",
                        lambda fn, **kw: seen.append(kw.get("options", {})) or fn)
    return seen


def test_train_compile_mode_reaches_torch_compile(tmp_path, verdict_path, capsys,
                                                  compile_options):
    """--compile-mode max-autotune compiles the model with inductor's autotuning, is saved
    with the run, and without --compile is a one-line error."""
    seen = compile_options
    _train(tmp_path, verdict_path, "--compile", "--compile-mode", "max-autotune", capsys=capsys)
    assert seen[0]["max_autotune"] and "triton.cudagraphs" not in seen[0]
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["train_args"]["compile_mode"] == "max-autotune"
    rc = main(["train", "--data", str(verdict_path), "--compile-mode", "max-autotune",
               "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert rc == 2 and "--compile-mode max-autotune needs --compile" in err, err


def test_the_cli_offers_compile_models_modes():
    from diygpt import speed
    from diygpt.cli import speed_flags

    assert speed_flags.COMPILE_MODES == speed.COMPILE_MODES


def test_resume_keeps_the_compile_mode_or_takes_a_typed_one(tmp_path, verdict_path, capsys,
                                                            compile_options):
    seen = compile_options
    _train(tmp_path, verdict_path, "--compile", "--compile-mode", "max-autotune",
           "--save-every", "2", "--max-steps", "2", capsys=capsys)
    run = str(tmp_path / "run")

    def resume(*extra: str) -> tuple[bool, str]:
        seen.clear()
        assert main(["train", "--resume", run, "--no-progress", *extra]) == 0
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        return bool(seen[0].get("max_autotune")), state["train_args"]["compile_mode"]

    assert resume("--max-steps", "4") == (True, "max-autotune")
    assert resume("--max-steps", "6", "--compile-mode", "max-autotune-aten") == (
        True, "max-autotune-aten")
    assert seen[0]["max_autotune_gemm_backends"] == "ATEN"
    assert resume("--max-steps", "8", "--compile-mode", "default") == (False, "default")


def test_fp16_resume_is_exact_and_keeps_the_loss_scale(tmp_path, verdict_path, capsys):
    whole = tmp_path / "whole"
    _train(whole, verdict_path, "--dtype", "fp16", "--save-every", "2", "--max-steps", "6",
           capsys=capsys)
    part = tmp_path / "part"
    _train(part, verdict_path, "--dtype", "fp16", "--save-every", "2", capsys=capsys)  # 4 steps
    assert main(["train", "--resume", str(part / "run"), "--max-steps", "6", "--no-progress"]) == 0

    def last(run: Path) -> tuple[dict, dict]:
        ckpt = max((run / "run").glob("ckpt-*"))
        return (json.loads((ckpt / "state.json").read_text())["grad_scaler"],
                load_file(ckpt / "model.safetensors"))

    (scaler_a, weights_a), (scaler_b, weights_b) = last(whole), last(part)
    assert scaler_a == scaler_b and scaler_a["_growth_tracker"] > 0
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_compiled_loss_equals_the_eager_loss_and_gradient():
    from diygpt.losses import token_cross_entropy
    from diygpt.speed import compile_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 8, TINY.vocab_size, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, TINY.vocab_size, (2, 8))
    eager = token_cross_entropy(logits, targets)
    (grad_eager,) = torch.autograd.grad(eager, logits)
    compiled = compile_loss()(logits, targets)
    (grad_compiled,) = torch.autograd.grad(compiled, logits)
    assert compiled.dtype == torch.float32 and grad_compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_compiled, grad_eager)


@pytest.mark.parametrize("ignored", [0, 3])
def test_logsumexp_cross_entropy_equals_the_books_loss_and_gradient(ignored):
    """The fusable form (compiled under --compile) against the book's loss, uncompiled so that
    only the formula differs; rows with target -100 are left out of the mean."""
    from diygpt.losses import logsumexp_cross_entropy, token_cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(2, 8, TINY.vocab_size) * 4).requires_grad_()
    targets = torch.randint(0, TINY.vocab_size, (2, 8))
    targets.view(-1)[:ignored] = -100
    book = token_cross_entropy(logits, targets)
    fusable = logsumexp_cross_entropy(logits, targets)
    (grad_book,) = torch.autograd.grad(book, logits)
    (grad_fusable,) = torch.autograd.grad(fusable, logits)
    torch.testing.assert_close(fusable, book, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_fusable, grad_book, rtol=1e-5, atol=1e-8)
    assert not grad_fusable.view(16, -1)[:ignored].any()


def test_fused_qkv_gives_the_same_logits_gradients_and_cached_generation():
    from diygpt.generation import generate
    from diygpt.speed import fuse_qkv

    for cfg in (TINY, TINY.with_updates(qkv_bias=True)):
        torch.manual_seed(0)
        plain, fused = GPTModel(cfg).double(), GPTModel(cfg).double()
        fused.load_state_dict(plain.state_dict())
        fuse_qkv(fused)
        assert all(b.att.fused_qkv for b in fused.trf_blocks)
        assert fused.state_dict().keys() == plain.state_dict().keys()  # the book's names
        idx = torch.randint(0, cfg.vocab_size, (2, 12))
        outs = []
        for model in (plain, fused):
            loss = model(idx).logsumexp(-1).mean()
            loss.backward()
            outs.append((loss, [p.grad for p in model.parameters()]))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-12, atol=1e-12)
        for g_fused, g_plain in zip(outs[1][1], outs[0][1], strict=True):
            torch.testing.assert_close(g_fused, g_plain, rtol=1e-10, atol=1e-12)
        plain.eval(), fused.eval()
        prompt = idx[:1, :3]
        assert torch.equal(generate(fused, prompt, 8, cfg.context_length),
                           generate(plain, prompt, 8, cfg.context_length))


def test_compile_fuses_qkv_on_the_gpu_only():
    """prepare_model turns fuse_qkv on under --compile for CUDA (where it was measured
    faster); it only sets flags, so a CPU model stands in for the GPU's."""
    from argparse import Namespace

    from diygpt.cli.speed_flags import prepare_model

    for compile_, device, expected in ((True, "cpu", False), (True, "cuda", True),
                                       (False, "cuda", False)):
        model = _model()
        args = Namespace(tf32=False, pad_vocab=False, compile=compile_, dtype="fp32", fsdp=False)
        prepare_model(args, model, torch.device(device))
        assert all(b.att.fused_qkv is expected for b in model.trf_blocks)
