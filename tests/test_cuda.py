"""The CUDA paths, checked on a GPU: skipped without one (CI), run by ``bench/gpu.sh``.

Tests elsewhere that take the ``device`` fixture also run on CUDA where there is one; these
are the checks that only make sense there: CPU/GPU parity, CUDA graphs, a real compiled
training run with MFU in its log line, fp16's GradScaler, and checkpoints crossing devices.
"""

from __future__ import annotations

import pytest
import torch
from cli_helpers import run_cli, train_tiny

from diygpt.checkpoints import load_model
from diygpt.config import get_preset
from diygpt.generation import generate
from diygpt.model import GPTModel
from diygpt.speed import peak_flops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CFG = get_preset("tiny").with_updates(vocab_size=300, context_length=16, qkv_bias=True)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 parity needs full-precision matmuls; a test that turns TF32 on leaks nothing."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _model(attn: str = "sdpa") -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(CFG.with_updates(attn_impl=attn)).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forward_and_gradients_match_the_cpu(attn):
    cpu = _model(attn)
    gpu = _model(attn).cuda()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.context_length))
    logits_cpu, logits_gpu = cpu(idx), gpu(idx.cuda())
    torch.testing.assert_close(logits_gpu.cpu(), logits_cpu, atol=1e-4, rtol=1e-4)
    logits_cpu.logsumexp(-1).mean().backward()
    logits_gpu.logsumexp(-1).mean().backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(b.grad.cpu(), a.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_cuda_graph_decode_equals_generate_also_past_the_window():
    from torch._dynamo.utils import counters

    model = _model().cuda()
    idx = torch.randint(0, CFG.vocab_size, (2, 3), device="cuda")
    expected = generate(model, idx, 20, CFG.context_length)  # 23 tokens > window 16
    counters.clear()
    assert torch.equal(generate(model, idx, 20, CFG.context_length, compile=True), expected)
    # the step really replays as a CUDA graph (inductor skips graphs that mutate inputs
    # it does not know to be static: the KV cache)
    assert counters["inductor"]["cudagraph_skips"] == 0
    one = generate(model, idx[:1], 13, CFG.context_length, compile=True)  # batch 1, in window
    assert torch.equal(one, generate(model, idx[:1], 13, CFG.context_length))


def _train(capsys, tmp_path, verdict_path, *flags: str) -> str:
    rc, out, err = train_tiny(capsys, verdict_path, tmp_path / "run", "--max-steps", "6",
                              "--eval-freq", "3", "--sample-prompt", "Every effort",
                              "--device", "cuda", *flags)
    assert rc == 0, err
    return out


def test_compiled_bf16_training_logs_mfu_and_saves_a_plain_checkpoint(tmp_path, verdict_path,
                                                                       capsys):
    out = _train(capsys, tmp_path, verdict_path, "--dtype", "bf16", "--compile", "--fused-adamw",
                 "--pad-vocab", "--tf32")
    lines = [line for line in out.splitlines() if line.startswith("Ep ")]
    assert lines and all(" tok/s" in line for line in lines)
    if peak_flops("cuda") is not None:
        assert all(", MFU " in line for line in lines)
    model = load_model(tmp_path / "run")  # onto the CPU: no _orig_mod. prefixes, 50257 rows
    assert model.out_head.weight.shape[0] == 50257
    assert next(model.parameters()).device.type == "cpu"


def test_fp16_training_with_grad_scaler_runs_and_resumes(tmp_path, verdict_path, capsys):
    out = _train(capsys, tmp_path, verdict_path, "--dtype", "fp16", "--save-every", "3")
    assert "Ep " in out and "nan" not in out.lower()
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "--max-steps", "8",
                         "--no-progress")
    assert rc == 0, err


def test_generate_cli_on_cuda_with_and_without_int8(tmp_path, verdict_path, capsys):
    _train(capsys, tmp_path, verdict_path)
    for extra in ((), ("--quantize", "int8"), ("--compile",)):
        rc, out, err = run_cli(capsys, "generate", "--checkpoint", tmp_path / "run", "--prompt",
                               "Every effort moves you", "--max-new-tokens", "8", "--device",
                               "cuda", *extra)
        assert rc == 0, (extra, err)
        assert out.startswith("Every effort moves you")
