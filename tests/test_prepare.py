"""``diygpt prepare``: streamed multi-threaded tokenization to a uint16 file."""

from __future__ import annotations

import numpy as np
from cli_helpers import TINY, run_cli

from diygpt.cli.main import main
from diygpt.data import load_training_data
from diygpt.prepare import load_tokens, prepare_tokens, read_blocks
from diygpt.tokenizer import EOT_ID


def test_tokens_equal_one_shot_encoding_with_small_blocks(tmp_path, tokenizer, verdict_text):
    src = tmp_path / "verdict.txt"
    src.write_text(verdict_text, encoding="utf-8")
    out = tmp_path / "tokens.bin"
    stats = prepare_tokens(src, out, tokenizer, threads=2, block_bytes=512, progress=False)
    ids = load_tokens(out)
    assert ids.dtype == np.uint16
    assert ids.tolist() == tokenizer.encode_ordinary(verdict_text)
    assert stats.tokens == len(ids) == 5145
    assert stats.bytes_read == src.stat().st_size


def test_blocks_end_at_newlines_and_cover_the_file(tmp_path):
    src = tmp_path / "a.txt"
    text = "".join(f"line {i} é.\n" for i in range(300)) + "no newline at the end"
    src.write_text(text, encoding="utf-8")
    blocks = list(read_blocks(src, block_bytes=100))
    assert "".join(b for b, _ in blocks) == text
    assert len(blocks) > 1 and all(b.endswith("\n") for b, _ in blocks[:-1])
    assert sum(n for _, n in blocks) == src.stat().st_size


def test_documents_are_separated_by_endoftext(tmp_path, tokenizer):
    for name, text in (("a.txt", "Hello world\n"), ("b.txt", "Every effort moves you\n")):
        (tmp_path / name).write_text(text)
    out = tmp_path / "out" / "tokens.bin"
    prepare_tokens(tmp_path, out, tokenizer, progress=False)
    expected = (tokenizer.encode_ordinary("Hello world\n") + [EOT_ID]
                + tokenizer.encode_ordinary("Every effort moves you\n"))
    assert load_tokens(out).tolist() == expected


def test_cli_reports_rate_and_bad_input_is_one_line(tmp_path, verdict_path, capsys):
    out = tmp_path / "t.bin"
    assert main(["prepare", "--data", str(verdict_path), "--out", str(out), "--no-progress"]) == 0
    done = capsys.readouterr()
    assert "5145 tokens" in done.out and "note" not in done.err
    other = tmp_path / "t.tok"  # written all the same; train would take it for text
    assert main(["prepare", "--data", str(verdict_path), "--out", str(other), "--no-progress"]) == 0
    assert "reads token files named *.bin" in capsys.readouterr().err
    assert other.read_bytes() == out.read_bytes()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    assert main(["prepare", "--data", str(bad), "--out", str(out)]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


def test_train_reads_prepared_token_files(tmp_path, tokenizer, data, capsys):
    out = tmp_path / "train.bin"
    prepare_tokens([data], out, tokenizer, progress=False)
    loaded = load_training_data([out], tokenizer, 0.9)
    ids = tokenizer.encode(data.read_text(encoding="utf-8"))
    split = int(0.9 * len(ids))
    assert loaded.train_ids.tolist() == ids[:split] and loaded.val_ids.tolist() == ids[split:]
    rc, stdout, err = run_cli(capsys, "train", "--data", out, *TINY, "--max-steps", "2",
                              "--eval-freq", "1", "--eval-iter", "1", "--sample-prompt", "",
                              "--no-progress", "--out", tmp_path / "run")
    assert rc == 0 and stdout.startswith("Ep 1 (Step 000000): Train loss "), err
    mixed = run_cli(capsys, "train", "--data", out, data, *TINY, "--out", tmp_path / "r2")
    assert mixed[0] == 2 and "not both" in mixed[2]
