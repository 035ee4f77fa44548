"""`diygpt train --init-from` and diygpt.warm_start: training that starts from given weights."""

import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run_cli, train_tiny

from book_reference import BookGPTModel
from diygpt import load_pretrained
from diygpt.checkpoints import load_model, load_optimizer_state, load_state_dict_file
from diygpt.config import get_preset
from diygpt.errors import CheckpointError, ConfigError
from diygpt.warm_start import start_model

OPENAI_DIR = Path(__file__).parent / "fixtures" / "gpt2-tiny-openai"


def test_start_model_holds_the_weights_untied_in_float32_for_training():
    reference = load_pretrained(OPENAI_DIR)
    model = start_model(OPENAI_DIR, drop_rate=0.1)
    assert model.training and model.cfg.drop_rate == 0.1
    assert model.out_head.weight is not model.tok_emb.weight  # the book's untied head
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.arange(20).view(2, 10)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), reference(ids))
    # Training the copy leaves the loaded weights alone.
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    assert torch.equal(model.out_head.weight, reference.out_head.weight)


def test_a_shorter_context_keeps_the_first_positions():
    reference = load_pretrained(OPENAI_DIR)
    model = start_model(OPENAI_DIR, context_length=8).eval()
    assert model.cfg.context_length == 8 and model.pos_emb.weight.shape[0] == 8
    ids = torch.arange(16).view(2, 8)
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


def test_the_weights_shape_is_not_overridden():
    with pytest.raises(ConfigError, match="have 64 positions; a context length of 65"):
        start_model(OPENAI_DIR, context_length=65)
    with pytest.raises(ConfigError, match="the weights have emb_dim 32, not the 48 asked for"):
        start_model(OPENAI_DIR, shape={"emb_dim": 48})


def test_cli_run_starts_from_another_runs_weights_and_resumes(data, tmp_path, capsys):
    first = tmp_path / "first"
    assert train_tiny(capsys, data, first, "--max-steps", "3")[0] == 0
    # A learning rate too small to move a trained weight: the second run's weights are the
    # first run's, its context cut to 8 positions.
    second = tmp_path / "second"
    rc, _, err = run_cli(capsys, "train", "--data", data, "--init-from", first, "--context-length",
                         "8", "--drop-rate", "0.1", "--lr", "1e-30", "--max-steps", "2",
                         "--batch-size", "2", "--sample-prompt", "", "--no-progress",
                         "--out", second)
    assert rc == 0, err
    assert f"starting from the weights of {first} (context 8, dropout 0.1)" in err
    before, after = load_state_dict_file(first / "model.safetensors"), load_model(second)
    assert after.cfg.context_length == 8 and after.cfg.drop_rate == 0.1
    for name, tensor in after.state_dict().items():
        expected = before[name][:8] if name == "pos_emb.weight" else before[name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-25)
    # Its shape is not the default preset's (book-124m), yet it resumes: the shape comes
    # from the checkpoint.
    rc, _, err = run_cli(capsys, "train", "--resume", second, "--max-steps", "3", "--no-progress")
    assert rc == 0 and "resuming from" in err, err
    assert load_model(second).cfg == after.cfg


def test_cli_init_from_mistakes_are_one_line(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_tiny(capsys, data, run, "--max-steps", "1")[0] == 0
    line = one_line_error(capsys, "train", "--data", data, "--init-from", run,
                          "--context-length", "17", "--out", tmp_path / "a")
    assert "have 16 positions; a context length of 17 would need more" in line
    line = one_line_error(capsys, "train", "--data", data, "--init-from", run,
                          "--preset", "book-124m", "--out", tmp_path / "b")
    assert "the weights have vocab_size" not in line and "not the 768 asked for" in line
    line = one_line_error(capsys, "train", "--data", data, "--init-from", tmp_path / "nothing",
                          "--out", tmp_path / "c")
    assert "no such file or folder" in line
    # A bare book file: a typed preset's shape is checked against the file's tensors, and
    # its context is asked for.
    torch.save(load_model(run).state_dict(), tmp_path / "model.pth")
    line = one_line_error(capsys, "train", "--data", data, "--init-from", tmp_path / "model.pth",
                          "--preset", "gpt2-small", "--out", tmp_path / "d")
    assert "model.pth: the file's emb_dim is 16, the requested config has 768 (wrong --preset?)" in line
    line = one_line_error(capsys, "train", "--data", data, "--init-from", tmp_path / "model.pth",
                          "--preset", "tiny", "--emb-dim", "16", "--n-heads", "2", "--out", tmp_path / "e")
    assert "the weights have 16 positions; a context length of 64 would need more" in line
    line = one_line_error(capsys, "train", "--data", data, "--init-from", tmp_path / "model.pth",
                          "--out", tmp_path / "f")
    assert "cannot tell n_heads for emb_dim 16" in line and "--preset NAME, with --emb-dim" in line
    line = one_line_error(capsys, "train", "--resume", run, "--init-from", tmp_path / "model.pth")
    assert "--init-from starts a new run from given weights; --resume continues" in line


def test_dropout_and_attention_are_the_runs_own_settings(data, tmp_path, capsys):
    # Not the source's: the book-124m preset's dropout (0.1) and sdpa, whatever the source ran.
    run = tmp_path / "run"
    assert train_tiny(capsys, data, run, "--max-steps", "1", "--attn", "eager")[0] == 0
    assert load_model(run).cfg.drop_rate == 0.0
    rc, _, err = run_cli(capsys, "train", "--data", data, "--init-from", run, "--max-steps", "1",
                         "--batch-size", "2", "--sample-prompt", "", "--no-progress",
                         "--out", tmp_path / "warm")
    assert rc == 0 and "(context 16, dropout 0.1); AdamW's state from it (step 1)" in err, err
    assert load_model(tmp_path / "warm").cfg.attn_impl == "sdpa"


def test_other_layouts_and_names_are_read_as_load_pretrained_reads_them(tmp_path, monkeypatch):
    # A Hugging Face file with a typed preset: detected, then checked against the preset.
    hf_file = Path(__file__).parent / "fixtures" / "gpt2-tiny-hf" / "model.safetensors"
    preset = get_preset("tiny").with_updates(emb_dim=32)
    with pytest.raises(ConfigError, match="the weights have vocab_size 500, not the 50257"):
        start_model(hf_file, file_cfg=preset, shape={"vocab_size": preset.vocab_size})
    # A GPT-2 name is its download folder, never a folder of that name here.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIYGPT_HOME", str(tmp_path / "home"))
    shutil.copytree(OPENAI_DIR, tmp_path / "gpt2-small")
    with pytest.raises(CheckpointError, match="no gpt2-small weights in"):
        start_model("gpt2-small")


def test_weights_holding_nan_are_refused_before_training(tmp_path):
    model = load_pretrained(OPENAI_DIR)
    with torch.no_grad():
        model.trf_blocks[1].att.W_key.weight[0, 0] = float("nan")
    torch.save(model.state_dict(), tmp_path / "diverged.pth")
    with pytest.raises(CheckpointError, match="W_key.weight holds NaN"):
        start_model(tmp_path / "diverged.pth", file_cfg=model.cfg)


def test_a_warm_start_with_adamws_state_takes_the_step_a_resume_takes(data, tmp_path, capsys):
    # A run's first epoch, then its next step twice: resumed, and as a new run started from
    # it (same settings, no shuffling, so the same first batch). AdamW's moments and step
    # counts came along, so the weights and the optimizer state are the same to the bit.
    first = tmp_path / "first"
    flags = ("--no-shuffle", "--attn", "eager")
    assert train_tiny(capsys, data, first, "--epochs", "1", *flags)[0] == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    rc, _, err = run_cli(capsys, "train", "--resume", resumed, "--epochs", "2", "--max-steps",
                         str(load_optimizer_state(first)["state"][0]["step"].int().item() + 1))
    assert rc == 0, err
    warm = tmp_path / "warm"
    rc, _, err = train_tiny(capsys, data, warm, "--init-from", first, "--max-steps", "1", *flags)
    assert rc == 0 and "AdamW's state from it (step 8)" in err, err
    assert (resumed / "model.safetensors").read_bytes() == (warm / "model.safetensors").read_bytes()
    ours, theirs = load_optimizer_state(warm), load_optimizer_state(resumed)
    for index, per in theirs["state"].items():
        assert all(torch.equal(ours["state"][index][k], v) for k, v in per.items())
    # --no-init-optimizer starts AdamW afresh: another step.
    rc, _, err = train_tiny(capsys, data, tmp_path / "fresh", "--init-from", first,
                            "--max-steps", "1", "--no-init-optimizer", *flags)
    assert rc == 0 and "AdamW starts afresh" in err
    assert int(load_optimizer_state(tmp_path / "fresh")["state"][0]["step"]) == 1


def test_a_books_model_and_optimizer_file_brings_its_adamw_state(data, tmp_path, capsys):
    # The book's section 5.4 file, trained a little with the book's own model and AdamW.
    torch.manual_seed(0)
    cfg = {"vocab_size": 50257, "context_length": 32, "emb_dim": 16, "n_heads": 2,
           "n_layers": 2, "drop_rate": 0.1, "qkv_bias": False}
    book = BookGPTModel(cfg)
    opt = torch.optim.AdamW(book.parameters(), lr=4e-4, weight_decay=0.1)
    for _ in range(2):
        ids = torch.randint(0, 50257, (2, 17))
        loss = torch.nn.functional.cross_entropy(book(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "model_and_optimizer.pth"
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    run = tmp_path / "run"
    rc, _, err = train_tiny(capsys, data, run, "--init-from", path, "--emb-dim", "16",
                            "--max-steps", "1", "--pad-vocab")
    assert rc == 0 and "(context 16, dropout 0); AdamW's state from it (step 2)" in err, err
    after = load_optimizer_state(run)
    assert {int(per["step"]) for per in after["state"].values()} == {3}
    # Its positions' moments were cut with the weight: 32 rows to the 16 asked for.
    assert after["state"][1]["exp_avg"].shape == (16, 16)


def _book_file(path, tie=False, groups=False):
    torch.manual_seed(0)
    cfg = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2,
           "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}
    book = BookGPTModel(cfg)
    if tie:
        book.out_head.weight = book.tok_emb.weight
    params = list(book.parameters())
    opt = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:]}] if groups else params)
    ids = torch.randint(0, 50257, (2, 17))
    torch.nn.functional.cross_entropy(book(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    return path


def test_adamw_states_that_do_not_map_are_one_line(data, tmp_path, capsys):
    tied = _book_file(tmp_path / "tied.pth", tie=True)
    shape = ("--emb-dim", "16", "--n-heads", "2", "--n-layers", "2")
    line = one_line_error(capsys, "train", "--data", data, "--init-from", tied, *shape,
                          "--out", tmp_path / "a")
    assert "holds 30 parameters, the model 31: a tied head's" in line
    assert line.endswith("; --no-init-optimizer starts AdamW afresh from these weights")
    grouped = _book_file(tmp_path / "grouped.pth", groups=True)
    line = one_line_error(capsys, "train", "--data", data, "--init-from", grouped, *shape,
                          "--out", tmp_path / "b")
    assert "the optimizer state has 2 parameter groups; only one" in line
    rc, _, err = train_tiny(capsys, data, tmp_path / "c", "--init-from", tied, "--max-steps", "1",
                            "--no-init-optimizer")
    assert rc == 0 and "AdamW starts afresh" in err, err
    line = one_line_error(capsys, "train", "--data", data, "--no-init-optimizer",
                          "--out", tmp_path / "d")
    assert line.endswith("--no-init-optimizer goes with --init-from")
