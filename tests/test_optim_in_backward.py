"""AdamW stepped inside backward: bit-identical to backward-then-step, and used only where exact."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import train_tiny

from diygpt import GPTModel, optim_in_backward
from diygpt.checkpointing import latest_checkpoint
from diygpt.data import prepare_loaders
from diygpt.errors import TrainingError
from diygpt.optim_in_backward import OptimInBackward, attached, blocker
from diygpt.precision import Precision
from diygpt.resume import read_training_checkpoint
from diygpt.training import TrainConfig, Trainer

SMALL = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2,
         "n_layers": 3, "drop_rate": 0.1, "qkv_bias": True}


def _trainer(text, tokenizer, mode, opt_kwargs=None, device="cpu", **cfg) -> Trainer:
    torch.manual_seed(5)
    train, val = prepare_loaders(text[:6000], tokenizer, 4, 32, shuffle=True)
    torch.manual_seed(5)
    # On CUDA the book's attention: SDPA's memory-efficient backward is not deterministic, and
    # this compares two runs bit for bit.
    model = GPTModel({**SMALL, "attn_impl": "eager"} if device != "cpu" else SMALL).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, **(opt_kwargs or {}))
    settings = dict(num_epochs=2, max_steps=7, eval_freq=3, eval_iter=2, start_context=None,
                    progress=False, optim_in_backward=mode)
    return Trainer(model, opt, train, val, device, TrainConfig(**{**settings, **cfg}))


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(),
                                 strict=True):
        assert torch.equal(x, y), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key, state in sa["state"].items():
        for field, value in state.items():
            assert torch.equal(value, sb["state"][key][field]), (key, field)


@pytest.mark.parametrize("opt_kwargs", [{"foreach": False}, {"foreach": True}, {"fused": True}],
                         ids=["single-tensor", "foreach", "fused"])
def test_bit_identical_to_the_ordinary_loop(verdict_text, tokenizer, opt_kwargs, device,
                                           monkeypatch):
    # The deferred tok_emb and out_head (50257 x 32) are stepped 512 rows at a time.
    monkeypatch.setattr(optim_in_backward, "SLICE_BYTES", 512 * 32 * 4)
    runs = {}
    for mode in (False, True):
        trainer = _trainer(verdict_text, tokenizer, mode, opt_kwargs, device, warmup_steps=2,
                           cosine=True)
        used = []
        trainer.train_step = _spy(trainer, used)
        trainer.fit()
        assert used and all(u is mode for u in used)
        runs[mode] = trainer
    _assert_same_state(runs[False], runs[True])
    assert runs[False].history.train_losses == runs[True].history.train_losses
    assert runs[False].history.val_losses == runs[True].history.val_losses
    assert all(p.grad is None for p in runs[True].model.parameters())


def _spy(trainer: Trainer, used: list):
    """Wrap train_step to record whether each step ran with the hooks attached."""
    step = trainer.train_step

    def wrapped(x, y):
        used.append(trainer.in_backward is not None)
        return step(x, y)

    return wrapped


def test_default_is_on_for_the_cpu_and_hooks_go_away(verdict_text, tokenizer):
    trainer = _trainer(verdict_text, tokenizer, None, max_steps=2)
    used = []
    trainer.train_step = _spy(trainer, used)
    trainer.fit()
    assert used == [True, True]
    assert trainer.in_backward is None
    assert not any(p._post_accumulate_grad_hooks for p in trainer.model.parameters())
    assert "forward" not in vars(trainer.model.out_head)  # the streamed head is undone
    # Outside fit() a step is the ordinary one: the gradients stay.
    x, y = next(iter(trainer.train_loader))
    trainer.train_step(x, y)
    assert all(p.grad is not None for p in trainer.model.parameters())


@pytest.mark.parametrize(("cfg", "why"), [
    ({"grad_clip": 1.0}, "--grad-clip"),
    ({"grad_accum": 2}, "--grad-accum"),
    ({"nan_policy": "skip"}, "--nan-policy skip"),
])
def test_falls_back_where_it_would_not_be_exact(verdict_text, tokenizer, capsys, cfg, why):
    trainer = _trainer(verdict_text, tokenizer, True, max_steps=2, **cfg)
    assert blocker(trainer) == why
    used = []
    trainer.train_step = _spy(trainer, used)
    trainer.fit()
    assert used == [False, False]
    assert f"--low-memory's) does not apply with {why}" in capsys.readouterr().err


def test_falls_back_for_fp16_and_other_optimizers(verdict_text, tokenizer):
    trainer = _trainer(verdict_text, tokenizer, True)
    trainer.precision = Precision("cpu", "fp16")
    assert blocker(trainer) == "fp16's GradScaler"
    trainer = _trainer(verdict_text, tokenizer, True)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    assert blocker(trainer) == "an optimizer other than Adam/AdamW"
    with attached(trainer) as hooks:
        assert hooks is None and trainer.in_backward is None


def test_off_and_unasked_say_nothing(verdict_text, tokenizer, capsys):
    trainer = _trainer(verdict_text, tokenizer, False, max_steps=2, grad_clip=1.0)
    with attached(trainer) as hooks:
        assert hooks is None
    trainer = _trainer(verdict_text, tokenizer, None, max_steps=2, grad_clip=1.0)
    with attached(trainer) as hooks:
        assert hooks is None
    assert capsys.readouterr().err == ""


def test_non_finite_loss_runs_no_backward(verdict_text, tokenizer):
    trainer = _trainer(verdict_text, tokenizer, True, max_steps=4)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    calls = {"n": 0}

    def poison(module, args, out):
        calls["n"] += module.training
        return out * float("nan") if calls["n"] == 2 else out

    trainer.model.register_forward_hook(poison)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 1 .*before "
                                            r"updating the weights;"):
        trainer.fit()
    assert trainer.history.global_step == 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def _weights_before_each_step(trainer: Trainer) -> dict[str, torch.Tensor]:
    """A dict that holds a copy of the weights as they were before the latest step."""
    before, step = {}, trainer.train_step

    def snapshot(x, y):
        before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return step(x, y)

    trainer.train_step = snapshot
    return before


def test_non_finite_gradient_is_never_applied(verdict_text, tokenizer):
    trainer = _trainer(verdict_text, tokenizer, True, max_steps=4)
    bad = "trf_blocks.1.ff.layers.0.weight"  # reached mid-backward
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    trainer.model.get_parameter(bad).register_hook(poison)
    before = _weights_before_each_step(trainer)
    with pytest.raises(TrainingError, match=r"non-finite gradient norm \(inf\) at step 1 .*"
                                            "weights that backward had not reached"):
        trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(p.grad is None for p in trainer.model.parameters())
    assert torch.equal(after[bad], before[bad])
    assert torch.equal(after["tok_emb.weight"], before["tok_emb.weight"])  # reached after it
    assert not torch.equal(after["final_norm.scale"], before["final_norm.scale"])  # before it


def _count_streams(monkeypatch) -> list[bool]:
    """Record what each call of OptimInBackward.stream_rows returned."""
    calls, real = [], OptimInBackward.stream_rows

    def counting(self, param, grad_rows):
        calls.append(real(self, param, grad_rows))
        return calls[-1]

    monkeypatch.setattr(OptimInBackward, "stream_rows", counting)
    return calls


def test_vocab_gradients_are_streamed_after_the_first_step(verdict_text, tokenizer,
                                                           monkeypatch):
    # Equality with the ordinary loop is test_bit_identical_to_the_ordinary_loop's: this
    # shows each whole gradient is made only in the first step, before AdamW's state.
    monkeypatch.setattr(optim_in_backward, "SLICE_BYTES", 512 * 32 * 4)
    calls = _count_streams(monkeypatch)
    trainer = _trainer(verdict_text, tokenizer, True, max_steps=4)
    whole = {"out_head": [], "tok_emb": []}
    for name, seen in whole.items():
        trainer.model.get_submodule(name).weight.register_post_accumulate_grad_hook(
            lambda p, seen=seen: seen.append(p.grad is not None))
    trainer.fit()
    assert calls == [False] * 2 + [True] * 6
    assert whole == {"out_head": [True, False, False, False], "tok_emb": [True] + [False] * 3}


def test_layers_that_are_not_streamed(verdict_text, tokenizer, monkeypatch):
    from diygpt.speed import pad_vocab
    from diygpt.streamed_grads import streamable_modules

    model = GPTModel(SMALL)
    assert streamable_modules(model) == [model.out_head, model.tok_emb]
    model.out_head.weight = model.tok_emb.weight
    assert streamable_modules(model) == []  # tied: two gradients to sum
    model = GPTModel(SMALL)
    pad_vocab(model)
    model.tok_emb.padding_idx = 0
    assert streamable_modules(model) == []
    # Under autocast the output head is the built-in linear, whose backward is in the
    # autocast dtype; the embedding is still streamed (its gradient stays fp32).
    monkeypatch.setattr(optim_in_backward, "SLICE_BYTES", 512 * 32 * 4)
    calls = _count_streams(monkeypatch)
    runs = {}
    for mode in (False, True):
        trainer = _trainer(verdict_text, tokenizer, mode, max_steps=3)
        trainer.precision = Precision("cpu", "bf16")
        whole = []
        trainer.model.out_head.weight.register_post_accumulate_grad_hook(
            lambda p, whole=whole: whole.append(p.grad is not None))
        trainer.fit()
        runs[mode] = trainer
    assert whole == [True] * 3
    assert calls == [False, True, True]  # the token embedding's
    _assert_same_state(runs[False], runs[True])


def test_non_finite_head_rows_stop_the_updates(verdict_text, tokenizer, monkeypatch):
    monkeypatch.setattr(optim_in_backward, "SLICE_BYTES", 512 * 32 * 4)
    trainer = _trainer(verdict_text, tokenizer, True, max_steps=4)
    calls = {"n": 0}

    def poison(grad):  # the logits' gradient, in step 1 (the first streamed one)
        calls["n"] += 1
        if calls["n"] == 2:
            grad = grad.clone()
            grad[..., 1300] = float("inf")  # a row of the head's third slice
        return grad

    def on_logits(module, args, out) -> None:
        if out.requires_grad:  # not in evaluation
            out.register_hook(poison)

    trainer.model.out_head.register_forward_hook(on_logits)
    before = _weights_before_each_step(trainer)
    with pytest.raises(TrainingError, match=r"non-finite gradient norm \(\w+\) at step 1 "):
        trainer.fit()
    after = trainer.model.state_dict()
    head, head_before = after["out_head.weight"], before["out_head.weight"]
    assert not torch.equal(head[:1024], head_before[:1024])  # the two slices before it
    assert torch.equal(head[1024:], head_before[1024:])
    assert all(torch.equal(v, before[k]) for k, v in after.items() if k != "out_head.weight")
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_same_total_norm_as_get_total_norm(verdict_text, tokenizer):
    trainer = _trainer(verdict_text, tokenizer, False)
    x, y = next(iter(trainer.train_loader))
    from diygpt.losses import calc_loss_batch

    torch.manual_seed(0)
    calc_loss_batch(x, y, trainer.model, "cpu").backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()])
    trainer.optimizer.zero_grad()
    hooks = OptimInBackward(trainer.optimizer)
    torch.manual_seed(0)
    got = hooks.backward(calc_loss_batch(x, y, trainer.model, "cpu"))
    hooks.remove()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_resume_across_modes_is_exact(verdict_text, tokenizer, tmp_path):
    straight = _trainer(verdict_text, tokenizer, False)
    straight.fit()
    first = _trainer(verdict_text, tokenizer, True, max_steps=4, out_dir=str(tmp_path / "run"),
                     save_every=2)
    first.fit()
    for mode in (True, False):
        resumed = _trainer(verdict_text, tokenizer, mode, out_dir=str(tmp_path / "run"))
        # Read anew each time: load_state_dict shares the moments, which the run then updates.
        resumed.load_checkpoint(read_training_checkpoint(latest_checkpoint(tmp_path / "run")))
        resumed.fit()
        _assert_same_state(straight, resumed)
        assert resumed.history.val_losses == straight.history.val_losses


def test_cli_flag(data, tmp_path, capsys, monkeypatch):
    made = []
    real = OptimInBackward.__init__

    def counting(self, optimizer, *args, **kwargs):
        made.append(kwargs.get("streamed"))
        real(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(OptimInBackward, "__init__", counting)
    streamed = _count_streams(monkeypatch)  # through the CLI's lean, recomputing model
    monkeypatch.setattr(optim_in_backward, "SLICE_BYTES", 512 * 16 * 4)  # 512-row slices
    weights = {}
    for flag in ("--optim-in-backward", "--no-optim-in-backward"):
        out = tmp_path / flag
        rc, _, err = train_tiny(capsys, data, out, "--max-steps", "3", "--drop-rate", "0.1", flag)
        assert rc == 0, err
        weights[flag] = (out / "model.safetensors").read_bytes()
    assert len(made) == 1 and len(made[0]) == 2  # the output head and token embedding
    assert streamed == [False] * 2 + [True] * 4  # both gradients, after the first step
    assert weights["--optim-in-backward"] == weights["--no-optim-in-backward"]
    rc, _, err = train_tiny(capsys, data, tmp_path / "clip", "--max-steps", "2",
                            "--optim-in-backward", "--grad-clip", "1")
    assert rc == 0 and "does not apply with --grad-clip" in err
