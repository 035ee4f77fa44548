"""`diygpt eval`'s windows: every next-token prediction of the text scored once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diygpt.config import get_preset
from diygpt.data import make_loader
from diygpt.losses import token_mean_loss
from diygpt.model import GPTModel
from diygpt.scoring import IGNORE, ScoredWindows


def _scored_positions(windows: ScoredWindows) -> list[int]:
    positions = []
    for i in range(len(windows)):
        start, _ = windows.windows[i]
        _, y = windows[i]
        positions += [start + 1 + j for j in range(len(y)) if y[j] != IGNORE]
    return positions


@pytest.mark.parametrize("n", [9, 16, 17, 40, 41])
@pytest.mark.parametrize("stride", [1, 3, 8])
def test_every_target_is_scored_once_with_its_true_next_token(n, stride):
    ids = list(range(100, 100 + n))
    windows = ScoredWindows(ids, 8, stride)
    assert sorted(_scored_positions(windows)) == list(range(1, n))  # each once, none left
    for i in range(len(windows)):
        x, y = windows[i]
        assert torch.equal(x[1:], torch.tensor(ids[windows.windows[i][0] + 1:][:7]))
        kept = y != IGNORE
        assert torch.equal(y[kept], (x + 1)[kept])  # ids are consecutive: the next token


def test_a_stride_past_the_window_still_skips_the_gaps_but_not_the_end():
    windows = ScoredWindows(list(range(50)), 8, 12)
    positions = _scored_positions(windows)
    assert len(positions) == len(set(positions)) and 49 in positions
    assert 10 not in positions  # between the windows at 0 and 12


def test_the_loss_is_the_mean_over_each_target_once():
    torch.manual_seed(0)
    model = GPTModel(get_preset("tiny").with_updates(vocab_size=300, context_length=8,
                                                     drop_rate=0.0)).eval()
    ids = torch.randint(0, 300, (30,)).tolist()
    windows = ScoredWindows(ids, 8, 4)
    with torch.no_grad():
        loss, scored = token_mean_loss(make_loader(windows, 3, False, False), model, "cpu")
        per_target = {}
        for i in range(len(windows)):  # each window alone, each kept target's own loss
            x, y = windows[i]
            ce = F.cross_entropy(model(x[None])[0], y, ignore_index=IGNORE, reduction="none")
            for j in (y != IGNORE).nonzero().flatten().tolist():
                per_target[windows.windows[i][0] + 1 + j] = ce[j].item()
    assert scored == 29 == len(per_target)
    assert loss == pytest.approx(sum(per_target.values()) / 29, rel=1e-5)


def test_eval_scores_the_end_of_the_text(tmp_path, capsys, tokenizer, verdict_text):
    from diygpt.checkpoints import save_run
    from diygpt.cli.main import main

    torch.manual_seed(0)
    save_run(tmp_path / "run", GPTModel(get_preset("tiny")), None, {})
    ids = tokenizer.encode(verdict_text)[:2 * 16 + 5]
    (tmp_path / "t.txt").write_text(tokenizer.decode(ids))
    n = len(tokenizer.encode((tmp_path / "t.txt").read_text()))
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "t.txt"),
                 "--context-length", "16", "--device", "cpu"]) == 0
    assert f"{n - 1} predictions scored, over a text of {n} tokens" in capsys.readouterr().out
