"""Open a single weights file as a :class:`TensorSource`: safetensors or a PyTorch pickle.

safetensors is parsed here from its documented layout (an 8-byte header length, a JSON
header, raw bytes) rather than through ``safe_open``, so that each tensor is its own
small memory map: a truncated file is reported with the tensor it cuts off, and pages
are released tensor by tensor while a model is assembled.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from diygpt.checkpointing import unwrapped_name
from diygpt.errors import CheckpointError
from diygpt.pretrained.source import ByteSpan, DictSource, MemmapSource, TensorSource

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024
# Hugging Face's sharded checkpoints: model.safetensors.index.json, pytorch_model.bin.index.json
SHARD_INDEX = ".index.json"


def open_safetensors(path: Path) -> MemmapSource:
    """Read the header of a ``.safetensors`` file; tensors are mapped on demand."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
            header_bytes = f.read(size)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if len(header_bytes) < size:
        raise CheckpointError(f"{path}: safetensors header is truncated")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    spans: dict[str, ByteSpan] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            # Offsets count from the end of the header: a negative one would read the
            # header's own bytes as weights (safetensors refuses it; a file cut short is
            # named when its tensor is read).
            if not (type(begin) is type(end) is int and 0 <= begin <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: tensor {name} has an unreadable or unsupported header entry"
            ) from None
        spans[unwrapped_name(name)] = ByteSpan(
            path, 8 + size + begin, end - begin, dtype, shape, bfloat16=info["dtype"] == "BF16"
        )
    return MemmapSource(path, spans)


def open_torch_file(path: Path) -> DictSource:
    """Load a ``.pth``/``.bin`` state dict with ``weights_only`` (never runs pickled code),
    memory-mapped where the file allows; a book training checkpoint (``model_state_dict``
    beside the optimizer) is accepted too."""
    from diygpt.checkpoints import safe_torch_load, state_dict_from  # torch: not for headers

    path = Path(path)
    tensors = state_dict_from(safe_torch_load(path, mmap=True), path)
    # A book user's torch.save(model.state_dict()) of a compiled or DDP-wrapped model
    return DictSource(path, {unwrapped_name(k): v for k, v in tensors.items()})


def open_sharded(index: Path) -> TensorSource:
    """Hugging Face's sharded checkpoint (``save_pretrained`` splits files over 5 GB, so
    gpt2-xl in fp32): an index naming the file of each tensor, read as one source."""
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: not a sharded checkpoint index (no weight_map)") from None
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard {missing[0]} is missing ({len(missing)} of "
                              f"{len(files)})")
    shards = [open_file(index.parent / f) for f in files]
    if all(isinstance(s, MemmapSource) for s in shards):
        return MemmapSource(index, {k: v for s in shards for k, v in s.spans.items()})
    if all(isinstance(s, DictSource) for s in shards):
        return DictSource(index, {k: v for s in shards for k, v in s.tensors.items()})
    raise CheckpointError(f"{index}: mixes safetensors and PyTorch shards")


def open_file(path: Path) -> TensorSource:
    """Open by content: a shard index, safetensors, else a PyTorch file (zip or pickle)."""
    path = Path(path)
    if path.name.endswith(SHARD_INDEX):
        return open_sharded(path)
    if path.suffix == ".safetensors":
        return open_safetensors(path)
    return open_torch_file(path)
