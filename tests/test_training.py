import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from book_reference import BookGPTModel, book_train_model_simple
from diygpt import GPTModel
from diygpt.data import prepare_loaders
from diygpt.schedule import lr_at_step
from diygpt.training import TrainConfig, Trainer, format_eval_line, train_model_simple

TINY = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2,
        "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}


def _setup(verdict_text, tokenizer, batch_size=4, seed=123, drop_rate=0.0):
    torch.manual_seed(seed)
    train, val = prepare_loaders(verdict_text[:6000], tokenizer, batch_size, 32, shuffle=True)
    torch.manual_seed(seed)
    model = GPTModel({**TINY, "drop_rate": drop_rate})
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    return model, opt, train, val


def test_book_log_format():
    assert format_eval_line(1, 0, 9.7401, 10.1119) == "Ep 1 (Step 000000): Train loss 9.740, Val loss 10.112"


def test_tiny_training_loss_falls_and_outputs_are_written(verdict_text, tokenizer, tmp_path):
    model, opt, train, val = _setup(verdict_text, tokenizer)
    lines = []
    cfg = TrainConfig(num_epochs=3, eval_freq=10, eval_iter=2, out_dir=str(tmp_path), progress=False)
    h = Trainer(model, opt, train, val, "cpu", cfg, tokenizer, log=lines.append).fit()
    assert h.train_losses[-1] < h.train_losses[0] - 1.0
    assert h.track_tokens_seen == [(s + 1) * 4 * 32 for s in h.steps]
    assert sum(ln.startswith("Every effort moves you") for ln in lines) == 3
    assert all("\n" not in ln for ln in lines)
    for name in ("model.safetensors", "optimizer.pt", "state.json", "metrics.jsonl", "loss.png"):
        assert (tmp_path / name).is_file(), name
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in records if "val_loss" in r] == pytest.approx(h.val_losses)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["global_step"] == h.global_step and state["config"]["emb_dim"] == 32


def test_train_model_simple_is_the_books_loop_to_the_bit(verdict_text, tokenizer, capsys):
    # The book's model and hand-written loop (F.cross_entropy, torch's AdamW) against ours
    # with the book's attention math, dropout on: the same printed log, returned lists and
    # final weights, bit for bit.
    cfg = {**TINY, "drop_rate": 0.1}
    results = []
    for ours in (False, True):
        torch.manual_seed(123)
        train, val = prepare_loaders(verdict_text[:6000], tokenizer, 4, 32, shuffle=True)
        torch.manual_seed(123)
        if not ours:
            model, fit = BookGPTModel(cfg), book_train_model_simple
        else:
            model, fit = GPTModel({**cfg, "attn_impl": "eager"}), train_model_simple
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
        lists = fit(model, train, val, opt, "cpu", num_epochs=2, eval_freq=5, eval_iter=2,
                    start_context="Every effort", tokenizer=tokenizer)
        weights = {k: v for k, v in model.state_dict().items() if not k.endswith(".mask")}
        results.append((capsys.readouterr().out, lists, weights))
    (book_out, book_lists, book_w), (out, lists, w) = results
    assert out.startswith("Ep 1 (Step 000000): Train loss ") and out.count("Every effort") == 2
    assert out == book_out
    assert lists == book_lists and len(lists[0]) > 2
    assert w.keys() == book_w.keys()
    assert all(torch.equal(w[k], book_w[k]) for k in w)


def test_ctrl_c_in_train_model_simple_is_a_keyboard_interrupt_after_the_step(
        verdict_text, tokenizer, capsys):
    # The book reader's `except KeyboardInterrupt:` around the loop keeps the model trained
    # so far; diygpt lets the step under way finish first, so its weights are whole.
    model, opt, train, val = _setup(verdict_text, tokenizer)
    batches = list(train)

    def ctrl_c_at_third_batch():
        for i, batch in enumerate(batches):
            if i == 2:
                signal.raise_signal(signal.SIGINT)
            yield batch

    class Loader:
        def __len__(self):
            return len(batches)

        def __iter__(self):
            return ctrl_c_at_third_batch()

    with pytest.raises(KeyboardInterrupt) as stop:
        train_model_simple(model, Loader(), val, opt, "cpu", num_epochs=1, eval_freq=100,
                           eval_iter=1, start_context="Every effort", tokenizer=tokenizer)
    assert stop.value.step == 2  # steps 0 and 1, then the third batch's step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert all(s["step"] == 3 for s in opt.state.values())


def test_train_model_simple_takes_a_list_of_batches_as_the_book_does(verdict_text, tokenizer):
    # The book's loop only iterates its loaders; a list has no sampler generator to snapshot.
    # No dropout: a DataLoader draws a seed from torch's RNG at each iter(), a list does not.
    results = []
    for as_list in (False, True):
        torch.manual_seed(123)
        train, val = prepare_loaders(verdict_text[:6000], tokenizer, 4, 32, shuffle=False)
        model = GPTModel(TINY)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
        loaders = (list(train), list(val)) if as_list else (train, val)
        losses = train_model_simple(model, *loaders, opt, "cpu", num_epochs=2, eval_freq=3,
                                    eval_iter=1, start_context="Every effort", tokenizer=tokenizer)
        results.append((losses, model.out_head.weight.detach().clone()))
    assert results[0][0] == results[1][0] and len(results[0][0][0]) > 1
    assert torch.equal(results[0][1], results[1][1])


def test_gradient_accumulation_gives_the_same_update(verdict_text, tokenizer):
    results = []
    for accum in (1, 2):
        model, opt, train, val = _setup(verdict_text, tokenizer)
        cfg = TrainConfig(num_epochs=1, max_steps=3, eval_freq=100, grad_accum=accum,
                          start_context=None, progress=False)
        Trainer(model, opt, train, val, "cpu", cfg).fit()
        results.append(model.out_head.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def test_max_steps_clipping_and_schedule(verdict_text, tokenizer):
    model, opt, train, val = _setup(verdict_text, tokenizer)
    cfg = TrainConfig(num_epochs=5, max_steps=4, eval_freq=1, eval_iter=1, grad_clip=0.5,
                      warmup_steps=2, cosine=True, min_lr=1e-5, start_context=None, progress=False)
    h = Trainer(model, opt, train, val, "cpu", cfg).fit()
    assert h.global_step == 3 and h.steps == [0, 1, 2, 3]
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at_step(3, 2e-3, 2, 4, 1e-5, True))


def test_lr_schedule_shape():
    lrs = [lr_at_step(s, 1.0, warmup_steps=4, total_steps=20, min_lr=0.1, cosine=True) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lr_at_step(7, 3e-4) == 3e-4


def test_the_books_function_names_are_importable():
    import diygpt

    for name in ("GPTModel", "create_dataloader_v1", "calc_loss_batch", "calc_loss_loader",
                 "train_model_simple", "evaluate_model", "generate_and_print_sample",
                 "generate_text_simple", "generate", "text_to_token_ids", "token_ids_to_text",
                 "plot_losses", "load_pretrained", "download_and_load_gpt2",
                 "load_weights_into_gpt", "load_gpt2_params_from_tf_ckpt",
                 # chapter 4's classes
                 "MultiHeadAttention", "LayerNorm", "GELU", "FeedForward", "TransformerBlock"):
        assert callable(getattr(diygpt, name)), name
        assert name in dir(diygpt) and name in diygpt.__all__, name  # lazy ones too
    assert diygpt.model.GPTModel is diygpt.GPTModel  # submodules as attributes, as before
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        diygpt.nonexistent  # noqa: B018


def test_plot_losses_returns_the_figure_and_leaves_matplotlibs_backend_alone(tmp_path):
    # A notebook's inline backend must survive the import; the book's figure comes back.
    code = ("import matplotlib; matplotlib.use('pdf'); from diygpt import plot_losses; "
            "fig = plot_losses([0, 1], [10, 20], [3.0, 2.0], [3.5, 2.5], path=None); "
            "print(matplotlib.get_backend(), type(fig).__name__, len(fig.axes))")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120, cwd=tmp_path).stdout.split()
    assert out == ["pdf", "Figure", "2"]
    assert list(tmp_path.iterdir()) == []  # path=None saves nothing
    from diygpt import plot_losses

    fig = plot_losses([0, 1], [10, 20], [3.0, 2.0], [3.5, 2.5], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [line.get_label() for line in fig.axes[0].lines] == ["Training loss", "Validation loss"]


def test_metrics_and_state_are_strict_json_and_a_nan_loss_resumes(tmp_path, capsys,
                                                                   verdict_path):
    from cli_helpers import train_tiny

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    run = tmp_path / "run"
    # --train-ratio 1: no validation split, so every val loss is nan
    rc, _, err = train_tiny(capsys, verdict_path, run, "--train-ratio", "1", "--max-steps", "3",
                            "--save-every", "2")
    assert rc == 0, err
    records = [strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["val_loss"] is None and isinstance(records[0]["train_loss"], float)
    states = [run / "state.json", *run.glob("ckpt-*/state.json")]
    assert len(states) >= 2
    for state in states:
        strict(state.read_text())
    rc, _, err = train_tiny(capsys, verdict_path, run, "--train-ratio", "1", "--max-steps", "5",
                            "--resume", str(run))
    assert rc == 0, err


def test_the_loss_figure_ends_where_the_run_stopped(tmp_path, capsys, verdict_path,
                                                    monkeypatch):
    from cli_helpers import train_tiny
    from matplotlib.figure import Figure

    import diygpt.plotting

    seen = []
    monkeypatch.setattr(diygpt.plotting, "plot_losses",
                        lambda epochs, *rest, **kwargs: seen.append(epochs) or Figure())
    rc, out, err = train_tiny(capsys, verdict_path, tmp_path / "run", "--max-steps", "6",
                              "--epochs", "5")
    assert rc == 0, err
    per_epoch = int(err.split(" train / ")[0].rsplit(" ", 1)[-1])
    assert seen and seen[0][-1] == pytest.approx(6 / per_epoch)  # not a whole epoch


def test_one_evaluation_is_drawn_and_a_nan_loss_keeps_the_tokens_axis(tmp_path):
    from diygpt import plot_losses

    one = plot_losses([0.0], [256], [10.9], [10.95], path=None)
    assert [line.get_marker() for line in one.axes[0].lines] == ["o", "o"]
    fig = plot_losses([0.0, 1.0], [1, 2], [float("inf"), 9.0], [10.0, 9.0], path=None)
    ax1, ax2 = fig.axes
    low, high = ax2.get_xlim()
    assert low <= 1 and high >= 2  # the tokens axis spans what the epochs axis spans


def test_a_folder_where_the_run_writes_a_file_is_one_line(tmp_path, capsys, verdict_path):
    from cli_helpers import one_line_error

    (tmp_path / "run" / "loss.png").mkdir(parents=True)
    line = one_line_error(capsys, "train", "--data", verdict_path, "--preset", "tiny",
                          "--max-steps", "1", "--out", tmp_path / "run")
    assert "loss.png is a folder, where the run writes a file" in line
