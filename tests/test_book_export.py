"""`diygpt export` and diygpt.book_export: files the book's own code loads strictly."""

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error, run_cli, train_tiny

from book_reference import BookGPTModel
from diygpt import GPTModel
from diygpt.book_export import book_optimizer_state, book_state_dict, save_book_checkpoint
from diygpt.checkpoints import load_optimizer_state, load_state_dict_file, save_run
from diygpt.errors import CheckpointError
from diygpt.speed import pad_vocab

CFG = {"vocab_size": 200, "context_length": 16, "emb_dim": 32, "n_heads": 4,
       "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}


def _step(model, opt, batch):
    inputs, targets = batch
    logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()


def _batch(seed):
    ids = torch.randint(0, CFG["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def test_the_state_dict_is_the_books_names_order_and_masks():
    model = GPTModel(CFG)
    exported = book_state_dict(model)
    book = BookGPTModel(CFG)
    assert list(exported) == list(book.state_dict())
    assert all(torch.equal(exported[k], v) for k, v in book.state_dict().items() if k.endswith(".mask"))
    book.load_state_dict(exported)  # strict
    ids = _batch(0)[0]
    eager = GPTModel({**CFG, "attn_impl": "eager"})
    eager.load_state_dict(model.state_dict())
    assert torch.equal(book(ids), eager(ids))


def test_the_books_adamw_trains_on_from_the_exported_state_to_the_bit(tmp_path):
    # Two steps in diygpt, then a third both in diygpt and in the book's model with the
    # book's AdamW loaded from the file: the same weights and moments, bit for bit.
    torch.manual_seed(0)
    model = GPTModel({**CFG, "attn_impl": "eager"})
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    for seed in (1, 2):
        _step(model, opt, _batch(seed))
    path = tmp_path / "model_and_optimizer.pth"
    save_book_checkpoint(path, model, opt.state_dict())

    checkpoint = torch.load(path, weights_only=True)
    book = BookGPTModel(CFG)
    book.load_state_dict(checkpoint["model_state_dict"])
    book_opt = torch.optim.AdamW(book.parameters(), lr=0.0005, weight_decay=0.1)
    book_opt.load_state_dict(checkpoint["optimizer_state_dict"])
    assert book_opt.param_groups[0]["lr"] == 4e-4  # the run's, as in the book's section 5.4
    _step(model, opt, _batch(3))
    _step(book, book_opt, _batch(3))
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in book.state_dict().items() if not k.endswith(".mask"))
    for ours_p, book_p in zip(model.parameters(), book.parameters(), strict=True):
        assert torch.equal(opt.state[ours_p]["exp_avg_sq"], book_opt.state[book_p]["exp_avg_sq"])


@pytest.mark.parametrize("against", ["the run's unpadded model", "the padded model itself"])
def test_padded_head_moments_lose_their_padding_rows_and_kernel_flags_reset(tmp_path, against):
    model = pad_vocab(GPTModel(CFG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    _step(model, opt, _batch(1))
    path = tmp_path / "model_and_optimizer.pth"
    save_book_checkpoint(path, model if "padded" in against else GPTModel(CFG), opt.state_dict())
    state = torch.load(path, weights_only=True)["optimizer_state_dict"]
    head = len(list(model.parameters())) - 1
    assert state["state"][head]["exp_avg"].shape == (CFG["vocab_size"], CFG["emb_dim"])
    assert torch.equal(state["state"][head]["exp_avg"], opt.state[model.out_head.weight]["exp_avg"][:200])
    assert state["param_groups"][0]["foreach"] is None and state["param_groups"][0]["lr"] == 1e-3
    assert book_optimizer_state(state, GPTModel(CFG))["state"][head]["exp_avg"].shape[0] == 200
    book = BookGPTModel(CFG)
    book_opt = torch.optim.AdamW(book.parameters())
    book_opt.load_state_dict(state)
    _step(book, book_opt, _batch(2))  # the book's AdamW steps with them


def test_another_optimizers_state_is_one_error():
    model = GPTModel(CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    _step(model, opt, _batch(1))
    with pytest.raises(CheckpointError, match="not AdamW's"):
        book_optimizer_state(opt.state_dict(), model)


def test_an_optimizer_state_of_another_model_is_one_error():
    small = GPTModel({**CFG, "n_layers": 1})
    opt = torch.optim.AdamW(small.parameters())
    _step(small, opt, _batch(1))
    with pytest.raises(CheckpointError, match="belongs to another model"):
        book_optimizer_state(opt.state_dict(), GPTModel(CFG))
    wide = GPTModel({**CFG, "emb_dim": 16})
    opt = torch.optim.AdamW(wide.parameters())
    _step(wide, opt, _batch(1))
    with pytest.raises(CheckpointError, match="tok_emb.weight has shape"):
        book_optimizer_state(opt.state_dict(), GPTModel(CFG))


def test_cli_export_of_a_trained_run_loads_into_the_books_model_and_adamw(
        data, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = train_tiny(capsys, data, run, "--max-steps", "3", "--pad-vocab")
    assert rc == 0, err
    out = tmp_path / "export" / "model_and_optimizer.pth"
    rc, printed, err = run_cli(capsys, "export", "--checkpoint", run, "--out", out, "--optimizer")
    assert rc == 0, err
    # The printed snippet is the book's code: its config builds the book's model.
    line = next(ln for ln in printed.splitlines() if "GPTModel(" in ln)
    cfg = ast.literal_eval(line.split("GPTModel(", 1)[1].rstrip(")"))
    checkpoint = torch.load(out, weights_only=True)
    book = BookGPTModel(cfg)
    book.load_state_dict(checkpoint["model_state_dict"])
    book_opt = torch.optim.AdamW(book.parameters(), lr=0.0005, weight_decay=0.1)
    book_opt.load_state_dict(checkpoint["optimizer_state_dict"])
    saved = load_optimizer_state(run)
    for i, p in enumerate(book.parameters()):
        assert torch.equal(book_opt.state[p]["exp_avg"], saved["state"][i]["exp_avg"][: p.shape[0]])
        assert int(book_opt.state[p]["step"]) == 3

    rc, printed, err = run_cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "m.pth")
    assert rc == 0 and "model.load_state_dict(torch.load(" in printed, err
    BookGPTModel(cfg).load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True))


def test_cli_export_reads_a_run_at_its_newest_checkpoint(data, tmp_path, capsys, monkeypatch):
    # A run that died after its checkpoints (no final save): the run folder's own files
    # follow each checkpoint, and export reads the newest one whatever they hold.
    from diygpt.trainer_state import TrainerState

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(TrainerState, "_finish", lambda self: None)
        assert train_tiny(capsys, data, run, "--max-steps", "3", "--save-every", "1",
                          "--keep-last", "3")[0] == 0
    newest = run / "ckpt-000002"
    assert (run / "optimizer.pt").samefile(newest / "optimizer.pt")
    # An older diygpt left the run folder's optimizer.pt at an earlier step.
    (run / "optimizer.pt").unlink()
    shutil.copy(run / "ckpt-000000" / "optimizer.pt", run / "optimizer.pt")
    out = tmp_path / "m.pth"
    assert run_cli(capsys, "export", "--checkpoint", run, "--out", out, "--optimizer")[0] == 0
    checkpoint = torch.load(out, weights_only=True)
    steps = {int(s["step"]) for s in checkpoint["optimizer_state_dict"]["state"].values()}
    assert steps == {3}
    weights = load_state_dict_file(newest / "model.safetensors")
    assert all(torch.equal(checkpoint["model_state_dict"][k], v) for k, v in weights.items())


def test_cli_export_mistakes_are_one_line(tmp_path, capsys):
    model = GPTModel(CFG)
    save_run(tmp_path / "run", model, None, {"global_step": 0})
    torch.save(model.state_dict(), tmp_path / "w.pth")
    line = one_line_error(capsys, "export", "--checkpoint", tmp_path / "w.pth", "--preset",
                          "tiny", "--out", tmp_path / "x.pth", "--optimizer")
    assert "--optimizer takes the AdamW state of a run folder" in line
    line = one_line_error(capsys, "export", "--checkpoint", tmp_path / "run",
                          "--out", tmp_path / "x.pth", "--optimizer")
    assert "optimizer.pt: missing" in line
    line = one_line_error(capsys, "export", "--checkpoint", tmp_path / "run", "--out", tmp_path)
    assert "is a folder" in line
    line = one_line_error(capsys, "export", "--checkpoint", tmp_path / "run",
                          "--out", f"{tmp_path / 'new'}/")
    assert "is a folder" in line and not (tmp_path / "new").exists()
    line = one_line_error(capsys, "export", "--checkpoint", tmp_path / "run",
                          "--out", tmp_path / "w.pth" / "x.pth")
    assert "w.pth is a file, not a folder" in line
    line = one_line_error(capsys, "export", "--checkpoint", tmp_path / "run",
                          "--out", tmp_path / "x.safetensors")
    assert "not safetensors; name it .pth" in line
    # A damaged optimizer.pt is named, and nothing is written.
    torch.save({"state": {}, "param_groups": ["x"]}, tmp_path / "run" / "optimizer.pt")
    line = one_line_error(capsys, "export", "--checkpoint", tmp_path / "run",
                          "--out", tmp_path / "x.pth", "--optimizer")
    assert "run/optimizer.pt: not a torch AdamW state dict" in line
    torch.save(torch.optim.AdamW(model.parameters()).state_dict(), tmp_path / "run" / "optimizer.pt")
    line = one_line_error(capsys, "export", "--checkpoint", tmp_path / "run",
                          "--out", tmp_path / "x.pth", "--optimizer", "--dtype", "bf16")
    assert "drop --dtype bf16" in line
    assert not (tmp_path / "x.pth").exists()


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    # torch.save's zip writer reports a full disk as RuntimeError, not OSError.
    import diygpt.checkpointing as checkpointing

    model = GPTModel(CFG)
    save_run(tmp_path / "run", model, None, {"global_step": 0})

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    line = one_line_error(capsys, "export", "--checkpoint", tmp_path / "run", "--out", tmp_path / "x.pth")
    assert line.endswith("x.pth: no space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_cli_export_of_openais_weights_gives_the_book_model_tensorflows_logits(tmp_path, capsys):
    fixtures = Path(__file__).parent / "fixtures"
    rc, printed, err = run_cli(capsys, "export", "--weights", fixtures / "gpt2-tiny-openai",
                               "--out", tmp_path / "gpt2.pth")
    assert rc == 0, err
    line = next(ln for ln in printed.splitlines() if "GPTModel(" in ln)
    book = BookGPTModel(ast.literal_eval(line.split("GPTModel(", 1)[1].rstrip(")"))).eval()
    book.load_state_dict(torch.load(tmp_path / "gpt2.pth", weights_only=True))
    reference = json.loads((fixtures / "gpt2-tiny-reference.json").read_text())
    with torch.no_grad():
        logits = book(torch.tensor(reference["input_ids"]))
    np.testing.assert_allclose(logits.numpy(), np.load(fixtures / "gpt2-tiny-logits-tf.npy"),
                               atol=1e-4)
