"""The book's own route to OpenAI's weights (section 5.5), under its names.

``download_and_load_gpt2`` fetches OpenAI's release and returns the book's ``(settings,
params)``: the hparams.json dict, and a nested dict of numpy arrays (``params["wte"]``,
``params["blocks"][i]["attn"]["c_attn"]["w"]``...). ``load_weights_into_gpt`` copies them
into a GPTModel with ``assign``, as the book does: the output head gets its own copy of the
token embedding (untied), where :func:`diygpt.load_pretrained` shares one tensor.

The checkpoint is read by diygpt's own TF reader, so TensorFlow is not needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diygpt.errors import CheckpointError, ConfigError
from diygpt.pretrained.catalog import GPT2_MODELS
from diygpt.pretrained.openai import checkpoint_prefix
from diygpt.pretrained.tf_checkpoint import open_tf_checkpoint

# The book's model sizes (OpenAI's folder names) -> diygpt's names
_SIZES = {size: name for name, (size, _) in GPT2_MODELS.items()}


def download_and_load_gpt2(
    model_size: str, models_dir: str | os.PathLike
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Download OpenAI's ``model_size`` (124M, 355M, 774M or 1558M) into
    ``models_dir/model_size`` (files already there are kept) -> (settings, params)."""
    if model_size not in _SIZES:  # a ValueError, as the book's
        raise ConfigError(f"model size {model_size!r} is not one of {', '.join(_SIZES)}")
    from diygpt.pretrained.download import download

    folder = download(_SIZES[model_size], "openai", Path(models_dir) / model_size)
    hparams = folder / "hparams.json"
    try:
        settings = json.loads(hparams.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{hparams}: unreadable ({exc})") from None
    return settings, load_gpt2_params_from_tf_ckpt(checkpoint_prefix(folder), settings)


def load_gpt2_params_from_tf_ckpt(
    ckpt_path: str | os.PathLike, settings: dict[str, Any]
) -> dict[str, Any]:
    """OpenAI's TF checkpoint (its prefix, e.g. ``models/124M/model.ckpt``, as the book's
    ``tf.train.latest_checkpoint`` gives it, or the folder) as the book's nested dict of
    squeezed numpy arrays, one ``blocks`` entry per layer."""
    if Path(ckpt_path).is_dir():
        ckpt_path = checkpoint_prefix(Path(ckpt_path))
    source = open_tf_checkpoint(ckpt_path)
    n_layer = settings["n_layer"]
    params: dict[str, Any] = {"blocks": [{} for _ in range(n_layer)]}
    names = set(source.names())
    for name in sorted(names):
        parts = name.split("/")
        # Not outside "model/", nor an optimizer's slot: a name under another variable's
        # (".../w/Adam", "model/wte/Adam_1" in a fine-tuned checkpoint)
        if parts[0] != "model" or any("/".join(parts[:i]) in names for i in range(2, len(parts))):
            continue
        target = params
        if parts[1].startswith("h") and parts[1][1:].isdigit():
            layer = int(parts[1][1:])
            if layer >= n_layer:
                raise CheckpointError(f"{source.path}: tensor {name} is past the {n_layer} "
                                      "layers hparams.json names")
            target = params["blocks"][layer]
        # As the book reads them: "model/ln_f/g" is params["g"], "model/h0/attn/c_attn/w"
        # params["blocks"][0]["attn"]["c_attn"]["w"]
        for key in parts[2:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = np.squeeze(source.get(name).numpy())
    return params


def assign(left: torch.Tensor, right: np.ndarray | torch.Tensor) -> nn.Parameter:
    """The book's: ``right`` as a new Parameter, refused unless it has ``left``'s shape.
    (Made on ``left``'s device and in its dtype, so a model already moved stays whole.)"""
    if left is None:
        raise ValueError("the model has no tensor here: GPT-2's weights have query, key and "
                         "value biases, so build the model with qkv_bias=True (the gpt2-* "
                         "presets)")
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch. Left: {tuple(left.shape)}, Right: {tuple(right.shape)}")
    if isinstance(right, torch.Tensor):  # any device or dtype, with or without grad
        value = right.detach().to(left.device, left.dtype, copy=True)
    else:
        value = torch.tensor(np.asarray(right), dtype=left.dtype, device=left.device)
    return nn.Parameter(value)


def load_weights_into_gpt(gpt: nn.Module, params: dict[str, Any]) -> None:
    """The book's: copy OpenAI's ``params`` into ``gpt`` (a GPTModel with q/k/v bias),
    transposing Conv1D's (in, out) weights to Linear's (out, in)."""
    if len(params["blocks"]) != len(gpt.trf_blocks):  # before anything is replaced
        raise ValueError(f"the weights have {len(params['blocks'])} layers, the model "
                         f"{len(gpt.trf_blocks)}")
    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"])
    gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte"])
    for block, p in zip(gpt.trf_blocks, params["blocks"], strict=True):
        att, attn = block.att, p["attn"]
        q_w, k_w, v_w = np.split(attn["c_attn"]["w"], 3, axis=-1)
        q_b, k_b, v_b = np.split(attn["c_attn"]["b"], 3, axis=-1)
        for lin, w, b in ((att.W_query, q_w, q_b), (att.W_key, k_w, k_b),
                          (att.W_value, v_w, v_b), (att.out_proj, attn["c_proj"]["w"],
                                                    attn["c_proj"]["b"])):
            lin.weight = assign(lin.weight, w.T)
            lin.bias = assign(lin.bias, b)
        for lin, conv in ((block.ff.layers[0], p["mlp"]["c_fc"]),
                          (block.ff.layers[2], p["mlp"]["c_proj"])):
            lin.weight = assign(lin.weight, conv["w"].T)
            lin.bias = assign(lin.bias, conv["b"])
        for norm, ln in ((block.norm1, p["ln_1"]), (block.norm2, p["ln_2"])):
            norm.scale = assign(norm.scale, ln["g"])
            norm.shift = assign(norm.shift, ln["b"])
    gpt.final_norm.scale = assign(gpt.final_norm.scale, params["g"])
    gpt.final_norm.shift = assign(gpt.final_norm.shift, params["b"])
    gpt.out_head.weight = assign(gpt.out_head.weight, params["wte"])
