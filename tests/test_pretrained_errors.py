"""Loading errors are one line naming the file and the tensor; nothing loads half-way."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diygpt.errors import CheckpointError
from diygpt.pretrained import load_pretrained

FIXTURES = Path(__file__).parent / "fixtures"
OPENAI_DIR = FIXTURES / "gpt2-tiny-openai"
HF_DIR = FIXTURES / "gpt2-tiny-hf"


def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def _hf_copy(tmp: Path, edit) -> Path:
    sd = load_file(HF_DIR / "model.safetensors")
    edit(sd)
    shutil.copy(HF_DIR / "config.json", tmp)
    save_file(sd, tmp / "model.safetensors")
    return tmp / "model.safetensors"


def test_missing_tensor_names_file_and_tensor(tmp_path):
    path = _hf_copy(tmp_path, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"))
    message = _error(path)
    assert str(path) in message and "transformer.h.1.mlp.c_fc.bias" in message
    assert "missing" in message


def test_shape_mismatch_names_file_tensor_and_shapes(tmp_path):
    def edit(sd):
        sd["transformer.h.0.attn.c_attn.weight"] = torch.zeros(32, 95)

    path = _hf_copy(tmp_path, edit)
    message = _error(path)
    assert str(path) in message and "transformer.h.0.attn.c_attn.weight" in message
    assert "[32, 95]" in message and "[32, 96]" in message


def test_truncated_tf_data_shard_names_the_shard_and_a_tensor(tmp_path):
    folder = shutil.copytree(OPENAI_DIR, tmp_path / "m")
    data = folder / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    message = _error(folder)
    assert str(data) in message and "tensor model/" in message and "truncated" in message


def test_truncated_safetensors_names_a_tensor(tmp_path):
    shutil.copy(HF_DIR / "config.json", tmp_path)
    path = shutil.copy(HF_DIR / "model.safetensors", tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:-1000])
    message = _error(path)
    assert str(path) in message and "tensor " in message and "truncated" in message


def test_truncated_torch_file(tmp_path):
    path = shutil.copy(HF_DIR / "pytorch_model.bin", tmp_path / "pytorch_model.bin")
    path.write_bytes(path.read_bytes()[:5000])
    assert str(path) in _error(path)


def test_corrupt_tf_index(tmp_path):
    folder = shutil.copytree(OPENAI_DIR, tmp_path / "m")
    (folder / "model.ckpt.index").write_bytes(b"not an sstable" * 10)
    assert "model.ckpt.index" in _error(folder)


@pytest.mark.parametrize("content", [b"hello, not weights", b"\x00" * 64])
def test_wrong_format_file(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    assert str(path) in _error(path)


def test_unrelated_state_dict_is_not_mistaken_for_gpt2(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, path)
    message = _error(path)
    assert "not GPT-2 weights" in message and "encoder.weight" in message


def test_unknown_suffix_and_unknown_name(tmp_path):
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"x")
    assert "unknown weights format" in _error(path)
    assert "gpt2-huge" in _error("gpt2-huge")


def test_missing_preset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DIYGPT_HOME", str(tmp_path))
    message = _error("gpt2-small")
    assert "diygpt download gpt2-small" in message
    assert str(tmp_path / "models" / "gpt2-small") in message


def test_folder_without_weights(tmp_path):
    assert "no weights found" in _error(tmp_path)


def test_strict_by_default_refuses_extra_tensors(tmp_path):
    model = load_pretrained(OPENAI_DIR)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["trf_blocks.0.att.extra"] = torch.zeros(2)
    torch.save(sd, tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(
        '{"vocab_size": 500, "context_length": 64, "emb_dim": 32, "n_heads": 4,'
        ' "n_layers": 2, "qkv_bias": true}'
    )
    assert "unexpected tensor trf_blocks.0.att.extra" in _error(tmp_path / "model.pth")
    assert load_pretrained(tmp_path / "model.pth", strict=False).cfg.n_layers == 2


def test_unknown_dtype():
    assert "fp8" in _error(OPENAI_DIR, dtype="fp8")
