"""Run folders and weight files: save and load model, optimizer and training state.

A run folder holds ``model.safetensors`` (weights under the book's names), ``optimizer.pt``
(the optimizer state dict) and ``state.json`` (model config, counters, training settings).
A book ``model.pth`` (``torch.save(model.state_dict())``) or ``model_and_optimizer.pth``
(``{"model_state_dict": ..., "optimizer_state_dict": ...}``) loads too. Every ``torch.load``
uses ``weights_only=True``: a pickle from a stranger cannot run code.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diygpt.checkpointing import (
    atomic_write,
    link_or_copy,
    refuse_special_weights,
    unwrapped_name,
    write_json,
)
from diygpt.config import GPTConfig
from diygpt.errors import CheckpointError, ConfigError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain GPTModel under torch.compile (``_orig_mod``) and DDP/FSDP (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and the book's ``att.mask`` buffers from a state dict."""
    out = {}
    for key, value in state_dict.items():
        key = unwrapped_name(key)
        if key.endswith(".att.mask"):
            continue
        out[key] = value
    return out


def model_state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unwrapped, contiguous CPU tensors; a tied out_head is stored as its own copy."""
    state = clean_state_dict(unwrap_model(model).state_dict())
    if any(t.dtype == torch.int8 for t in state.values()):
        # diygpt.quantize's layers: int8 buffers no loader reads as weights
        raise CheckpointError("an int8-quantized model cannot be saved: save the model before "
                              "quantize_int8, and quantize it again after loading")
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.data_ptr()
        if ptr in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(ptr)
        out[key] = tensor
    return out


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    state = model_state_for_saving(model)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


# torch.load(weights_only=True) could still run code before 2.6 (CVE-2025-32434).
MIN_SAFE_TORCH = (2, 6)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def require_safe_torch(path: Path) -> None:
    """Call before any ``torch.load``: refuse torch versions whose weights_only is unsafe."""
    if torch_version() < MIN_SAFE_TORCH:
        raise CheckpointError(
            f"{path}: refusing to read a .pt/.pth file with torch {torch.__version__}: versions "
            "before 2.6 can run code from a crafted file (CVE-2025-32434); upgrade torch, or use "
            ".safetensors"
        )


def safe_torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` that accepts tensors and plain containers only; any failure is one line.

    With ``mmap`` a zip-format file (every ``torch.save`` since PyTorch 1.6) is memory-mapped
    instead of read; an older file is read into memory.
    """
    require_safe_torch(path)
    try:
        with warnings.catch_warnings():
            # torch warns of a TorchScript archive before refusing it, which the error below
            # says in one line
            warnings.filterwarnings("ignore", message=".*TorchScript.*")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if not (mmap and "mmap" in str(exc)):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not _looks_like_torch_save(path):
            raise CheckpointError(f"{path}: not a file torch.save wrote (neither its zip "
                                  "format nor a pickle)") from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found and (found[1].endswith("Model") or found[1].startswith("torch.nn.modules")):
            raise CheckpointError(
                f"{path}: refused to load: it holds a whole model ({found[1]}, from "
                "torch.save(model)), whose pickle could run code; save model.state_dict(), as "
                "the book does"
            ) from None
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: refused to load: the file holds Python objects other than tensors "
                "(a pickle could run code); only plain state dicts are accepted"
            ) from None
        if isinstance(exc, OSError) and exc.strerror:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch weights file (truncated or wrong format?): {first}"
        ) from None


def _looks_like_torch_save(path: Path) -> bool:
    """torch.save's zip (``PK``) or a pickle (protocol 2+ starts with 0x80)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return True  # let the caller's error say why it cannot be read
    return head[:2] == b"PK" or head[:1] == b"\x80"


def state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded ``.pth``: a plain state dict, or the book's
    ``{"model_state_dict": ..., "optimizer_state_dict": ...}``."""
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a model state dict of tensors")
    return obj


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read model weights from a .safetensors file, or a book .pth/.pt (plain or with optimizer)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return clean_state_dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None
    return clean_state_dict(state_dict_from(safe_torch_load(path), path))


def load_into(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """Strict load with a one-line error naming the file and the first bad tensor.

    ``assign=True`` adopts the given tensors (for a model built on the meta device).
    """
    expected = unwrap_model(model).state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]} ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]}")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(state_dict[key].shape)}, "
                f"the model expects {tuple(tensor.shape)} (wrong --preset?)"
            )
    unwrap_model(model).load_state_dict(state_dict, strict=True, assign=assign)


def save_run(
    out_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> Path:
    """Write weights, optimizer state and state.json (config + counters) into a run folder.

    Each file is replaced atomically (see ``checkpointing``): a crash leaves old or new files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / MODEL_FILE)
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        atomic_write(out / OPTIMIZER_FILE, lambda tmp: torch.save(opt_state, tmp))
    _write_state(out, unwrap_model(model).cfg, state)
    return out


def save_run_links(
    out_dir: str | os.PathLike, checkpoint: Path, cfg: GPTConfig, state: dict[str, Any]
) -> Path:
    """:func:`save_run` for a run whose final state is ``checkpoint``: its weights and
    optimizer state are hard-linked into the run folder (copied where links fail)."""
    out = Path(out_dir)
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        link_or_copy(checkpoint / name, out / name)
    _write_state(out, cfg, state)
    return out


def _write_state(out: Path, cfg: GPTConfig, state: dict[str, Any]) -> None:
    write_json(out / STATE_FILE, {"config": cfg.to_dict(), **state})


def read_run_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (is {run_dir} a diygpt run folder?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: has no model config")
    return state


def config_from_run(run_dir: str | os.PathLike) -> GPTConfig:
    state = read_run_state(run_dir)
    try:
        return GPTConfig.from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{Path(run_dir) / STATE_FILE}: invalid config ({exc})") from None


def load_optimizer_state(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(run_dir) / OPTIMIZER_FILE
    if not path.is_file():
        return None
    return safe_torch_load(path)


def refuse_non_finite(model: nn.Module, source: str | os.PathLike) -> None:
    """One line naming the first weight that holds NaN or inf (a run that diverged saved it).

    Checked at load: a NaN in attention's query or key weights never reaches the logits
    under CPU SDPA (which gives such rows zeros), so the text would just be quietly wrong.
    """
    # Each tensor once (a tied head is the embedding); a sum, which any NaN or inf makes
    # non-finite, reads it without the bool copy isfinite() makes (0.43 -> 0.03 s, gpt2-small).
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if (tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum()))
                and not bool(torch.isfinite(tensor).all())):  # not a finite sum's overflow
            raise CheckpointError(
                f"{source}: weight {name} holds NaN or infinite values: the weights are broken "
                "(e.g. saved from a run that diverged); load another checkpoint"
            )


_SHAPE_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias")


def load_model(
    checkpoint: str | os.PathLike,
    cfg: GPTConfig | None = None,
    device: torch.device | str = "cpu",
    attn_impl: str | None = None,
) -> nn.Module:
    """Build a GPTModel in eval mode from a run folder, or from a weights file plus ``cfg``.

    For a run folder the config comes from its state.json; a ``cfg`` given as well must
    agree with it in shape, so a wrong --preset is caught before any tensor is read.
    """
    from diygpt.model import GPTModel

    path = Path(checkpoint)
    if path.is_dir():
        run_cfg = config_from_run(path)
        if cfg is not None:
            diff = [f for f in _SHAPE_FIELDS if getattr(cfg, f) != getattr(run_cfg, f)]
            if diff:
                raise CheckpointError(
                    f"{path}: the checkpoint's {diff[0]} is {getattr(run_cfg, diff[0])}, "
                    f"the requested config has {getattr(cfg, diff[0])} (a run folder carries "
                    "its own config: drop --preset)"
                )
        cfg, weights = run_cfg, path / MODEL_FILE
    elif path.is_file():
        if (path.parent / STATE_FILE).is_file() and (cfg is None or path.name == STATE_FILE):
            # RUN/model.safetensors or RUN/state.json: the run folder carries the config
            raise CheckpointError(f"{path} is one file of the run {path.parent}: give the run "
                                  f"folder (--checkpoint {path.parent})")
        if cfg is None:
            raise CheckpointError(
                f"{path}: a bare weights file needs a model config (--preset NAME, or "
                "--weights FILE with the shape read from the tensors or a config.json beside it)"
            )
        weights = path
    else:
        refuse_special_weights(path)  # `--checkpoint <(cat model.pth)`
        raise CheckpointError(f"{path}: no such checkpoint file or run folder")
    if attn_impl is not None:
        cfg = cfg.with_updates(attn_impl=attn_impl)
    state_dict = load_state_dict_file(weights)
    if not path.is_dir():  # a run folder's config is its own; a bare file's was given
        check_file_shape(state_dict, cfg, path)
    with torch.device("meta"):
        model = GPTModel(cfg)
    load_into(model, state_dict, str(weights), assign=True)
    return model.to(device).eval()


def file_shape(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a book-layout state dict's tensors tell of its config (all but n_heads)."""
    shape: dict[str, Any] = {}
    if (emb := state_dict.get("tok_emb.weight")) is not None and emb.dim() == 2:
        shape["vocab_size"], shape["emb_dim"] = emb.shape
    if (pos := state_dict.get("pos_emb.weight")) is not None and pos.dim() == 2:
        shape["context_length"] = pos.shape[0]
    blocks = {key.split(".")[1] for key in state_dict if key.startswith("trf_blocks.")}
    if blocks:
        shape["n_layers"] = len(blocks)
        shape["qkv_bias"] = "trf_blocks.0.att.W_query.bias" in state_dict
    return shape


def check_file_shape(state_dict: dict[str, torch.Tensor], cfg: GPTConfig, path: Path) -> None:
    """One line naming the first field in which a bare weights file is not ``cfg``'s shape."""
    for field, have in file_shape(state_dict).items():
        if have != getattr(cfg, field):
            raise CheckpointError(
                f"{path}: the file's {field} is {have}, the requested config has "
                f"{getattr(cfg, field)} (wrong --preset?)"
            )
