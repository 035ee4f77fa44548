"""The book's section 5.5 route to OpenAI's weights: params dict, assign, load_weights_into_gpt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diygpt import GPTModel, load_pretrained, load_weights_into_gpt
from diygpt.pretrained.book_loader import assign, load_gpt2_params_from_tf_ckpt

OPENAI_DIR = Path(__file__).parent / "fixtures" / "gpt2-tiny-openai"
REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "gpt2-tiny-reference.json").read_text())


def _settings_and_params():
    settings = json.loads((OPENAI_DIR / "hparams.json").read_text())
    return settings, load_gpt2_params_from_tf_ckpt(OPENAI_DIR / "model.ckpt", settings)


def _book_model(settings, qkv_bias=True):
    return GPTModel({"vocab_size": settings["n_vocab"], "context_length": settings["n_ctx"],
                     "emb_dim": settings["n_embd"], "n_heads": settings["n_head"],
                     "n_layers": settings["n_layer"], "drop_rate": 0.0, "qkv_bias": qkv_bias})


def test_params_have_the_books_layout():
    settings, params = _settings_and_params()
    d = settings["n_embd"]
    assert sorted(params) == ["b", "blocks", "g", "wpe", "wte"]
    assert len(params["blocks"]) == settings["n_layer"]
    block = params["blocks"][1]
    assert sorted(block) == ["attn", "ln_1", "ln_2", "mlp"]
    assert block["attn"]["c_attn"]["w"].shape == (d, 3 * d)  # squeezed from [1, d, 3d]
    assert block["mlp"]["c_proj"]["w"].shape == (4 * d, d) and params["g"].shape == (d,)
    assert all(isinstance(a, np.ndarray) for a in (params["wte"], block["ln_2"]["b"]))
    from_folder = load_gpt2_params_from_tf_ckpt(OPENAI_DIR, settings)  # the folder works too
    assert np.array_equal(from_folder["wpe"], params["wpe"])


def test_load_weights_into_gpt_gives_openais_logits_with_an_untied_head():
    settings, params = _settings_and_params()
    gpt = _book_model(settings)
    load_weights_into_gpt(gpt, params)
    gpt.eval()
    ids = torch.tensor(REFERENCE["input_ids"])
    with torch.no_grad():
        logits = gpt(ids)
        assert torch.equal(logits, load_pretrained(OPENAI_DIR)(ids))
    tf_logits = np.load(Path(__file__).parent / "fixtures" / "gpt2-tiny-logits-tf.npy")
    np.testing.assert_allclose(logits.numpy(), tf_logits, atol=1e-4)
    # the book assigns the head its own copy of wte; load_pretrained shares one tensor
    assert gpt.out_head.weight is not gpt.tok_emb.weight
    assert torch.equal(gpt.out_head.weight, gpt.tok_emb.weight)


def test_assign_refuses_another_shape_and_a_model_without_qkv_bias():
    with pytest.raises(ValueError, match=r"Shape mismatch. Left: \(2, 3\), Right: \(3, 2\)"):
        assign(torch.zeros(2, 3), np.zeros((3, 2), dtype=np.float32))
    settings, params = _settings_and_params()
    with pytest.raises(ValueError, match="qkv_bias=True"):
        load_weights_into_gpt(_book_model(settings, qkv_bias=False), params)


def test_a_fine_tuned_checkpoints_optimizer_slots_are_left_out(tmp_path):
    from diygpt.pretrained.tf_checkpoint import open_tf_checkpoint, write_tf_bundle

    source = open_tf_checkpoint(OPENAI_DIR / "model.ckpt")
    tensors = {name: source.get(name).numpy() for name in source.names()}
    for name in list(tensors):  # what TF's Adam saves beside each variable
        tensors[f"{name}/Adam"] = tensors[f"{name}/Adam_1"] = np.zeros_like(tensors[name])
    tensors["global_step"] = np.zeros((), np.float32)
    write_tf_bundle(tmp_path / "model.ckpt", tensors)
    settings, plain = _settings_and_params()
    tuned = load_gpt2_params_from_tf_ckpt(tmp_path / "model.ckpt", settings)
    assert sorted(tuned) == sorted(plain)
    assert sorted(tuned["blocks"][0]["attn"]["c_attn"]) == ["b", "w"]
    assert np.array_equal(tuned["blocks"][1]["mlp"]["c_fc"]["w"],
                          plain["blocks"][1]["mlp"]["c_fc"]["w"])


def test_assign_takes_a_tensor_of_any_dtype_with_or_without_grad():
    right = torch.ones(2, 3, dtype=torch.bfloat16, requires_grad=True)
    made = assign(torch.zeros(2, 3), right)
    assert made.dtype == torch.float32 and torch.equal(made, torch.ones(2, 3))
    assert made.data_ptr() != right.data_ptr()
