"""--low-memory (activation recomputation) and the allocator setting: same numbers, less memory."""

from __future__ import annotations

import platform

import pytest
import torch
from cli_helpers import one_line_error, run_cli, train_tiny

from diygpt import GPTModel, memory
from diygpt.data import prepare_loaders
from diygpt.generation import generate_text_simple
from diygpt.memory import recompute_blocks
from diygpt.optim_in_backward import OptimInBackward
from diygpt.training import TrainConfig, Trainer

SMALL = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2,
         "n_layers": 3, "drop_rate": 0.1, "qkv_bias": False}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_recomputed_blocks_train_bit_identically(verdict_text, tokenizer, attn):
    states, losses = [], []
    for recompute in (False, True):
        torch.manual_seed(3)
        train, val = prepare_loaders(verdict_text[:6000], tokenizer, 4, 32, shuffle=True)
        torch.manual_seed(3)
        model = GPTModel({**SMALL, "attn_impl": attn})
        if recompute:
            recompute_blocks(model)
            recompute_blocks(model)  # a second call changes nothing
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
        cfg = TrainConfig(num_epochs=1, max_steps=5, eval_freq=2, eval_iter=2,
                          start_context="Every effort", sample_tokens=5, progress=False)
        lines = []
        h = Trainer(model, opt, train, val, "cpu", cfg, tokenizer, log=lines.append).fit()
        states.append(model.state_dict())
        losses.append((h.train_losses, h.val_losses, lines))
    assert losses[0] == losses[1]
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_recompute_keeps_only_block_inputs():
    torch.manual_seed(0)
    x = torch.randint(0, 50257, (2, 32))
    saved = []
    for recompute in (False, True):
        model = GPTModel(SMALL)
        if recompute:
            recompute_blocks(model)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept = {}

        def pack(t, kept=kept, weights=weights):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        out.sum().backward()
        saved.append(sum(kept.values()))
    assert saved[1] < saved[0] / 2


def test_recompute_is_off_without_grad_and_with_a_cache(tokenizer):
    torch.manual_seed(0)
    model = GPTModel(SMALL).eval()
    prompt = torch.tensor([tokenizer.encode("Every effort moves you")])
    expected = generate_text_simple(model, prompt, 6, 32)
    recompute_blocks(model)
    assert torch.equal(generate_text_simple(model, prompt, 6, 32), expected)
    assert "trf_blocks.0.att.W_query.weight" in model.state_dict()


GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize(("in_backward", "after_forward", "trim"), [
    (True, False, False), (False, True, False), (True, True, False), (False, True, True),
    (True, True, True)])
def test_malloc_tuning_hooks(monkeypatch, in_backward, after_forward, trim):
    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda param, value: calls.append(value) or True)
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append("trim"))
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert memory.tune_malloc(model, opt, trim_after_forward=after_forward,
                              trim_before_big_steps=trim)
    assert calls == [1 << 20]
    x = torch.randint(0, 50257, (2, 8))
    hooks = OptimInBackward(opt) if in_backward else None
    for step in range(2):
        calls.clear()
        opt.zero_grad()
        loss = model(x).sum()
        if hooks:
            hooks.backward(loss)
        else:
            loss.backward()
            opt.step()
        # One after the forward pass (--trim-heap); with trim (--low-memory), then one
        # before each step of the two embeddings (a quarter of the weights each), or before
        # the one step after backward. The threshold goes to its steady value after the
        # first step, once.
        expected = ["trim"] * (after_forward + trim * (2 if in_backward else 1))
        assert calls == expected + [memory.STEADY_THRESHOLD] * (step == 0)
    calls.clear()
    with torch.no_grad():
        model.eval()(x)
    assert calls == []  # evaluation is left alone


def test_malloc_recycling_settings(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda *setting: calls.append(setting) or True)
    model = GPTModel(SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert memory.tune_malloc(model, opt, recycle=True)
    assert calls == [(memory.M_MMAP_THRESHOLD, 1 << 20),
                     (memory.M_TRIM_THRESHOLD, memory.RECYCLE_TRIM)]
    calls.clear()
    for _ in range(2):
        model(torch.randint(0, 50257, (2, 8))).sum().backward()
        opt.step()
    assert calls == [(memory.M_MMAP_THRESHOLD, memory.RECYCLE_THRESHOLD)]


def test_recycling_keeps_the_steady_threshold_where_glibc_refuses_1_gib(monkeypatch):
    """glibc before 2.35 refuses an mmap threshold over 32 MiB."""
    calls = []

    def mallopt(param, value):
        calls.append(value)
        return value <= memory.STEADY_THRESHOLD or param == memory.M_TRIM_THRESHOLD

    monkeypatch.setattr(memory, "_mallopt", mallopt)
    model = GPTModel(SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert memory.tune_malloc(model, opt, recycle=True)
    model(torch.randint(0, 50257, (2, 8))).sum().backward()
    opt.step()
    assert calls[-2:] == [memory.RECYCLE_THRESHOLD, memory.STEADY_THRESHOLD]


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_malloc_setting_left_to_the_user(monkeypatch):
    model = GPTModel(SMALL)
    opt = torch.optim.AdamW(model.parameters())
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert memory.tune_malloc(model, opt) is False
    assert not opt._optimizer_step_post_hooks and not model._forward_hooks
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert memory.tune_malloc(model, opt, recycle=True) is False
    # The user's thresholds stand; the trims asked for still happen (they do not use them).
    assert memory.tune_malloc(model, opt, trim_after_forward=True) is False
    assert len(model._forward_hooks) == 1 and not opt._optimizer_step_post_hooks
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert memory.tune_malloc(model, opt) is True
    memory._malloc_trim()


def test_cli_low_memory_gives_the_same_weights(data, tmp_path, capsys):
    weights = []
    for extra in ([], ["--low-memory", "--no-malloc-tuning"], ["--no-recompute"],
                  ["--no-trim-heap"]):
        out = tmp_path / f"run{len(weights)}"
        rc, stdout, err = train_tiny(capsys, data, out, "--max-steps", "3", "--drop-rate", "0.1",
                                     *extra)
        assert rc == 0, err
        weights.append(((out / "model.safetensors").read_bytes(), stdout))
    assert weights[0] == weights[1] == weights[2] == weights[3]


@pytest.mark.parametrize(("extra", "trims"), [
    ((), True), (("--no-trim-heap",), False), (("--compile",), False),
    (("--compile", "--trim-heap"), True)])
def test_cli_trims_the_heap_by_default_on_the_cpu_uncompiled(data, tmp_path, capsys, monkeypatch,
                                                             extra, trims):
    """... and recycles big blocks in the heap where it does not trim."""
    seen = []
    # Recorded, not applied: glibc's settings would last for the rest of the test process.
    monkeypatch.setattr(memory, "tune_malloc", lambda *a, **kw: seen.append(kw) or True)
    monkeypatch.setattr("diygpt.speed.torch.compile", lambda fn, **kw: fn)  # wiring only
    rc, _, err = train_tiny(capsys, data, tmp_path / "run", "--max-steps", "1", *extra)
    assert rc == 0, err
    assert [(kw["trim_after_forward"], kw["recycle"]) for kw in seen] == [(trims, not trims)]


@pytest.mark.parametrize(("extra", "calls"), [
    (("--no-malloc-tuning",), []),
    (("--no-malloc-tuning", "--trim-heap"), [(True, False, False)]),
    (("--no-malloc-tuning", "--low-memory"), [(True, True, False)])])
def test_no_malloc_tuning_keeps_the_trims_that_were_asked_for(data, tmp_path, capsys,
                                                             monkeypatch, extra, calls):
    seen = []
    monkeypatch.setattr(memory, "tune_malloc", lambda *a, **kw: seen.append(kw) or True)
    rc, _, err = train_tiny(capsys, data, tmp_path / "run", "--max-steps", "1", *extra)
    assert rc == 0, err
    assert [(kw["trim_after_forward"], kw["trim_before_big_steps"], kw["thresholds"])
            for kw in seen] == calls


RECYCLE_CHECK = """
import resource, sys, torch
from diygpt import GPTModel, memory
model = GPTModel({"vocab_size": 50257, "context_length": 8, "emb_dim": 32, "n_heads": 2,
                  "n_layers": 1, "drop_rate": 0.0, "qkv_bias": False})
opt = torch.optim.AdamW(model.parameters())
assert memory.tune_malloc(model, opt, recycle=sys.argv[1] == "recycle")
model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
opt.step()  # the first step: the steady threshold from here on
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = torch.empty(100 << 20, dtype=torch.uint8).fill_(1)  # 100 MiB, as big as logits
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_recycling_reuses_big_blocks_instead_of_faulting_in_fresh_pages():
    """Ten 100 MiB blocks in turn: fresh mappings fault in every page each time (25,600
    4 KiB pages a block, fewer with huge pages); recycled, the first block's pages serve
    the others (a kernel that reclaims idle pages, as DAMON did on the project's machine,
    may take some back between blocks: one more block's faults in some runs)."""
    import subprocess
    import sys

    counts = {}
    for how in ("steady", "recycle"):
        done = subprocess.run([sys.executable, "-c", RECYCLE_CHECK, how], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        counts[how] = int(done.stdout.split()[-1])
    assert counts["recycle"] * 3 < counts["steady"], counts


def test_cli_low_memory_refuses_compile(data, tmp_path, capsys):
    line = one_line_error(capsys, "train", "--data", data, "--low-memory", "--compile",
                          "--out", tmp_path / "run")
    assert "--low-memory does not go with --compile" in line


def test_resume_with_low_memory_is_exact(data, tmp_path, capsys):
    common = ["--drop-rate", "0.1", "--no-malloc-tuning"]
    rc, _, err = train_tiny(capsys, data, tmp_path / "straight", "--max-steps", "5", *common)
    assert rc == 0, err
    rc, _, err = train_tiny(capsys, data, tmp_path / "run", "--max-steps", "3", "--save-every",
                            "3", "--no-optim-in-backward", "--no-recompute", *common)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "--max-steps", "5",
                         "--low-memory")
    assert rc == 0, err
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == \
        (tmp_path / "straight" / "model.safetensors").read_bytes()


@pytest.mark.parametrize(("saved", "typed", "expected"), [
    (False, [], None), (None, [], None), (True, [], True),
    (False, ["--no-trim-heap"], False), (None, ["--trim-heap"], True),
    ({"trim_heap": False, "compile_mode": "default"}, [], False)])
def test_resume_takes_an_older_runs_untyped_trim_heap_as_the_default(saved, typed, expected):
    """Old runs (no compile_mode setting) may hold False for "not given"; a newer run's False
    is a typed --no-trim-heap, which the resume keeps."""
    from diygpt.cli.main import build_parser
    from diygpt.cli.resume_args import merge_resume_args

    argv = ["train", "--resume", "runs/x", *typed]
    args = build_parser().parse_args(argv)
    args.argv = argv
    saved = saved if isinstance(saved, dict) else {"trim_heap": saved}
    assert merge_resume_args(args, saved, args.parser).trim_heap is expected
