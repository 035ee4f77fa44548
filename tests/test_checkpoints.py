import pickle

import pytest
import torch

from book_reference import BookGPTModel
from diygpt import GPTModel
from diygpt.checkpoints import (
    clean_state_dict,
    load_model,
    load_state_dict_file,
    save_run,
    save_weights,
)
from diygpt.config import GPTConfig
from diygpt.errors import CheckpointError

CFG = {"vocab_size": 200, "context_length": 16, "emb_dim": 32, "n_heads": 4,
       "n_layers": 2, "drop_rate": 0.1, "qkv_bias": False}


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_run_folder_roundtrip(tmp_path):
    model = GPTModel(CFG)
    opt = torch.optim.AdamW(model.parameters())
    save_run(tmp_path, model, opt, {"global_step": 3})
    loaded = load_model(tmp_path)
    assert _same(model, loaded) and not loaded.training and loaded.cfg == model.cfg


@pytest.mark.parametrize("layout", ["plain", "with_optimizer"])
def test_book_pth_files_load(tmp_path, layout):
    book = BookGPTModel(CFG)
    opt = torch.optim.AdamW(book.parameters(), lr=4e-4)
    path = tmp_path / "model.pth"
    if layout == "plain":
        torch.save(book.state_dict(), path)
    else:
        torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    model = load_model(path, GPTConfig.from_dict(CFG))
    assert torch.equal(model.out_head.weight, book.out_head.weight)


def test_our_weights_load_into_the_books_model(tmp_path):
    model = GPTModel(CFG)
    save_weights(model, tmp_path / "w.safetensors")
    sd = load_state_dict_file(tmp_path / "w.safetensors")
    book = BookGPTModel(CFG)
    missing = book.load_state_dict(sd, strict=False).missing_keys
    assert all(k.endswith("att.mask") for k in missing)
    assert torch.equal(book.tok_emb.weight, model.tok_emb.weight)


def test_wrapper_prefixes_are_stripped():
    sd = {"_orig_mod.module.tok_emb.weight": torch.zeros(1), "trf_blocks.0.att.mask": torch.zeros(1)}
    assert list(clean_state_dict(sd)) == ["tok_emb.weight"]


def test_compiled_model_saves_clean_names(tmp_path):
    class Wrapper(torch.nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    save_weights(Wrapper(GPTModel(CFG)), tmp_path / "w.safetensors")
    assert all(not k.startswith("_orig_mod") for k in load_state_dict_file(tmp_path / "w.safetensors"))


def test_tied_weights_are_saved(tmp_path):
    model = GPTModel(CFG)
    model.out_head.weight = model.tok_emb.weight
    save_weights(model, tmp_path / "w.safetensors")
    assert torch.equal(load_state_dict_file(tmp_path / "w.safetensors")["out_head.weight"], model.tok_emb.weight)


def test_errors_name_the_file_and_tensor(tmp_path):
    model = GPTModel(CFG)
    sd = model.state_dict()
    sd.pop("final_norm.scale")
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing.pth: missing tensor final_norm.scale"):
        load_model(tmp_path / "missing.pth", GPTConfig.from_dict(CFG))
    torch.save(model.state_dict(), tmp_path / "full.pth")
    with pytest.raises(CheckpointError, match=r"full.pth: the file's vocab_size is 200, the "
                       r"requested config has 300 \(wrong --preset\?\)"):
        load_model(tmp_path / "full.pth", GPTConfig.from_dict({**CFG, "vocab_size": 300}))
    with pytest.raises(CheckpointError, match=r"full.pth: the file's qkv_bias is False"):
        load_model(tmp_path / "full.pth", GPTConfig.from_dict({**CFG, "qkv_bias": True}))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors: cannot read"):
        load_model(tmp_path / "junk.safetensors", GPTConfig.from_dict(CFG))
    with pytest.raises(CheckpointError, match="needs a model config"):
        load_model(tmp_path / "missing.pth")


def test_pickle_with_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"tok_emb.weight": Payload()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_preset_mismatch_with_run_folder(tmp_path):
    save_run(tmp_path, GPTModel(CFG), None, {})
    with pytest.raises(CheckpointError, match="n_layers is 2"):
        load_model(tmp_path, GPTConfig.from_dict({**CFG, "n_layers": 3}))
