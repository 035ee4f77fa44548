import os
import subprocess
import sys

import pytest
import torch

from diygpt.errors import TokenizerError
from diygpt.tokenizer import EOT_ID, get_tokenizer, text_to_token_ids, token_ids_to_text


def test_offline_tokenizer_matches_gpt2_ids(tokenizer):
    assert tokenizer.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert tokenizer.n_vocab == 50257


def test_roundtrip_and_endoftext(tokenizer):
    ids = text_to_token_ids("Hello, world.<|endoftext|>Bye", tokenizer)
    assert ids.shape[0] == 1 and EOT_ID in ids[0].tolist()
    assert token_ids_to_text(ids, tokenizer) == "Hello, world.<|endoftext|>Bye"
    assert token_ids_to_text(torch.tensor([6109, 3626]), tokenizer) == "Every effort"
    assert token_ids_to_text(torch.tensor([6109]), tokenizer) == "Every"  # (T,) with T = 1
    assert token_ids_to_text(torch.tensor([[6109]]), tokenizer) == "Every"
    assert text_to_token_ids("", tokenizer).dtype == torch.long  # not torch.tensor([])'s float


def test_env_var_folder_is_used(monkeypatch, tmp_path):
    from tests_helpers import TOKENIZER_DIR

    monkeypatch.setenv("DIYGPT_TOKENIZER_DIR", str(TOKENIZER_DIR))
    assert get_tokenizer().encode(" the") == [262]


def test_folder_without_files_gives_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="must contain encoder.json and vocab.bpe"):
        get_tokenizer(tmp_path)


def test_offline_without_files_says_how_to_supply_them(tmp_path):
    # A fresh interpreter with an empty tiktoken cache and no route to the network.
    code = (
        "import socket\n"
        "def deny(*a, **k): raise OSError('network disabled')\n"
        "socket.socket.connect = deny\n"
        "socket.create_connection = deny\n"
        "from diygpt.tokenizer import get_tokenizer\n"
        "from diygpt.errors import TokenizerError\n"
        "try:\n    get_tokenizer()\nexcept TokenizerError as e:\n    print('ERR', e)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    if "PYTHONPATH" in os.environ:  # diygpt run from a checkout (src/) rather than installed
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert "ERR" in out.stdout, out.stderr
    assert "--tokenizer-dir" in out.stdout and "DIYGPT_TOKENIZER_DIR" in out.stdout


@pytest.mark.parametrize("damage", ["garbage encoder", "cut encoder", "cut vocab"])
def test_a_damaged_tokenizer_folder_is_one_error(tmp_path, damage):
    from tests_helpers import TOKENIZER_DIR

    encoder = (TOKENIZER_DIR / "encoder.json").read_bytes()
    vocab = (TOKENIZER_DIR / "vocab.bpe").read_bytes()
    if damage == "garbage encoder":
        encoder = b"garbage\n"
    elif damage == "cut encoder":
        encoder = encoder[:100_000]
    else:
        vocab = vocab[:200_000]
    (tmp_path / "encoder.json").write_bytes(encoder)
    (tmp_path / "vocab.bpe").write_bytes(vocab)
    with pytest.raises(TokenizerError, match="are unreadable or not GPT-2's .*; copy them again"):
        get_tokenizer(tmp_path)
