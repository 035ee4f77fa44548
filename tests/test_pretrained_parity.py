"""Every weights format loads into a GPTModel whose logits equal transformers' GPT-2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diygpt.generation import generate
from diygpt.pretrained import load_pretrained

FIXTURES = Path(__file__).parent / "fixtures"
OPENAI_DIR = FIXTURES / "gpt2-tiny-openai"
HF_DIR = FIXTURES / "gpt2-tiny-hf"
REFERENCE = json.loads((FIXTURES / "gpt2-tiny-reference.json").read_text())
IDS = torch.tensor(REFERENCE["input_ids"])
TINY_CONFIG = {
    "vocab_size": 500,
    "context_length": 64,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(HF_DIR).eval()


@pytest.fixture(scope="module")
def hf_logits(hf_model) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(IDS).logits


@pytest.fixture(scope="module")
def hf_greedy(hf_model) -> list[int]:
    ids = IDS
    with torch.no_grad():
        for _ in range(len(REFERENCE["greedy_tokens"])):
            ids = torch.cat([ids, hf_model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, IDS.shape[1] :].tolist()


def _strip_prefix(tmp: Path, suffix: str) -> Path:
    sd = {
        k.removeprefix("transformer."): v
        for k, v in load_file(HF_DIR / "model.safetensors").items()
    }
    shutil.copy(HF_DIR / "config.json", tmp)
    path = tmp / f"model{suffix}"
    (save_file if suffix == ".safetensors" else torch.save)(sd, path)
    return path


def _book_file(tmp: Path, suffix: str) -> Path:
    model = load_pretrained(OPENAI_DIR)
    (tmp / "config.json").write_text(json.dumps(TINY_CONFIG))
    path = tmp / f"gpt2-tiny{suffix}"
    if suffix == ".safetensors":  # safetensors cannot share storage: the file is untied
        sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, path)
    else:  # like the book's model.pth, with its causal-mask buffers
        sd = dict(model.state_dict())
        for i in range(TINY_CONFIG["n_layers"]):
            sd[f"trf_blocks.{i}.att.mask"] = torch.ones(64, 64).triu(1)
        torch.save(sd, path)
    return path


FORMATS = {
    "openai-folder": lambda tmp: OPENAI_DIR,
    "openai-index": lambda tmp: OPENAI_DIR / "model.ckpt.index",
    "hf-folder-safetensors": lambda tmp: HF_DIR,
    "hf-bin": lambda tmp: HF_DIR / "pytorch_model.bin",
    "hf-safetensors-no-prefix": lambda tmp: _strip_prefix(tmp, ".safetensors"),
    "hf-bin-no-prefix": lambda tmp: _strip_prefix(tmp, ".bin"),
    "book-pth": lambda tmp: _book_file(tmp, ".pth"),
    "book-safetensors": lambda tmp: _book_file(tmp, ".safetensors"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_logits_and_greedy_tokens_match_transformers(fmt, tmp_path, hf_logits, hf_greedy):
    model = load_pretrained(FORMATS[fmt](tmp_path))
    assert not model.training
    with torch.no_grad():
        logits = model(IDS)
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=1e-5)
    tf_logits = torch.from_numpy(np.load(FIXTURES / "gpt2-tiny-logits-tf.npy"))
    torch.testing.assert_close(logits, tf_logits, rtol=0, atol=1e-5)
    out = generate(model, IDS, max_new_tokens=len(hf_greedy), context_size=64, temperature=0.0)
    assert out[0, IDS.shape[1] :].tolist() == hf_greedy == REFERENCE["greedy_tokens"]


@pytest.mark.parametrize("fmt", ["openai-folder", "hf-folder-safetensors", "hf-bin", "book-pth"])
def test_gpt2_shares_one_tensor_between_tok_emb_and_out_head(fmt, tmp_path):
    model = load_pretrained(FORMATS[fmt](tmp_path))
    assert model.out_head.weight is model.tok_emb.weight


def test_book_file_with_separate_head_stays_untied(tmp_path):
    model = load_pretrained(_book_file(tmp_path, ".safetensors"))
    assert model.out_head.weight is not model.tok_emb.weight
    torch.testing.assert_close(model.out_head.weight, model.tok_emb.weight)


@pytest.mark.parametrize("dtype", ["bf16", torch.float16])
def test_dtype_is_applied_at_load_time(dtype, hf_logits):
    model = load_pretrained(OPENAI_DIR, dtype=dtype)
    expected = torch.bfloat16 if dtype == "bf16" else torch.float16
    assert {p.dtype for p in model.parameters()} == {expected}
    assert model.out_head.weight is model.tok_emb.weight
    with torch.no_grad():
        logits = model(IDS).float()
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=0.1)


def test_fp32_load_has_no_meta_tensors_and_maps_the_file():
    model = load_pretrained(HF_DIR)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.fixture
def tiny_sizes(monkeypatch):
    """The fixtures stand in for every GPT-2 size: the names are checked against its shape."""
    from diygpt.pretrained import catalog

    for name in catalog.GPT2_SHAPES:
        monkeypatch.setitem(catalog.GPT2_SHAPES, name, (32, 2))


def test_preset_name_loads_from_the_download_folder(tmp_path, monkeypatch, hf_logits,
                                                    tiny_sizes):
    monkeypatch.setenv("DIYGPT_HOME", str(tmp_path))
    shutil.copytree(OPENAI_DIR, tmp_path / "models" / "gpt2-small")
    model = load_pretrained("gpt2-small")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf_logits, rtol=0, atol=1e-5)


def test_download_dir_argument_overrides_the_home(tmp_path, tiny_sizes):
    shutil.copytree(HF_DIR, tmp_path / "w")
    model = load_pretrained("gpt2-medium", download_dir=tmp_path / "w")
    assert model.cfg.emb_dim == 32


def test_cli_pretrained_name_ignores_a_folder_of_that_name_here(tmp_path, monkeypatch, capsys,
                                                                tiny_sizes):
    from cli_helpers import run_cli

    monkeypatch.setenv("DIYGPT_HOME", str(tmp_path / "home"))
    shutil.copytree(OPENAI_DIR, tmp_path / "home" / "models" / "gpt2-small")
    # A folder named like the size, holding something else, in the working directory.
    (tmp_path / "gpt2-small").mkdir()
    (tmp_path / "gpt2-small" / "notes.txt").write_text("not weights")
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(
        capsys, "generate", "--pretrained", "gpt2-small", "--prompt", "!",
        "--max-new-tokens", "2",
    )
    assert rc == 0, err



def test_an_index_of_several_blocks_reads_the_same(tmp_path, hf_logits):
    # The fixture's index (written by TensorFlow) is one block; a larger checkpoint's has
    # several, listed by the index block. Write the fixture's tensors with blocks of 5
    # entries (prefix-compressed keys, restarts) and load them again.
    from diygpt.pretrained.tf_checkpoint import open_tf_checkpoint, read_index, write_tf_bundle

    source = open_tf_checkpoint(OPENAI_DIR / "model.ckpt")
    tensors = {name: source.get(name).numpy() for name in source.names()}
    folder = tmp_path / "124M"
    folder.mkdir()
    for name in ("checkpoint", "hparams.json"):
        shutil.copy(OPENAI_DIR / name, folder / name)
    write_tf_bundle(folder / "model.ckpt", tensors, block_entries=5)
    assert read_index(folder / "model.ckpt.index").keys() == read_index(
        OPENAI_DIR / "model.ckpt.index").keys()
    assert (folder / "model.ckpt.index").read_bytes().count(b"model/h1/mlp") < len(
        [n for n in tensors if n.startswith("model/h1/mlp")])  # keys share prefixes
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(folder)(IDS), hf_logits, rtol=0, atol=1e-5)



def test_a_name_whose_folder_holds_another_size_is_refused(tmp_path, monkeypatch, capsys):
    # A mirror that served the wrong model: --pretrained gpt2-small ran a 32-wide model.
    from cli_helpers import one_line_error

    monkeypatch.setenv("DIYGPT_HOME", str(tmp_path))
    shutil.copytree(OPENAI_DIR, tmp_path / "models" / "gpt2-small")
    line = one_line_error(capsys, "generate", "--pretrained", "gpt2-small", "--prompt", "!")
    assert "its hparams.json says 32 wide, 2 layers; gpt2-small is 768 wide, 12 layers" in line
