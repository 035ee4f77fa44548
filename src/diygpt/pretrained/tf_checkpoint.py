"""Read TensorFlow checkpoints (the tensor-bundle format) with numpy alone.

A checkpoint ``PREFIX`` is ``PREFIX.index`` plus data shards ``PREFIX.data-0000i-of-0000n``.
The index is a LevelDB-style SSTable mapping each tensor name to a ``BundleEntryProto``
(dtype, shape, shard, offset, size); the empty key holds a ``BundleHeaderProto``. We decode
the table and the protobuf varints by hand so that loading OpenAI's GPT-2 release needs
neither TensorFlow nor protobuf; the tensor bytes are then memory-mapped from the shard.
Checksums (crc32c) are not verified: that would read every byte in pure Python. Sizes are.

:func:`write_tf_bundle` is the inverse, for test fixtures and benchmarks of any size.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from diygpt.errors import CheckpointError
from diygpt.pretrained.source import ByteSpan, MemmapSource

TABLE_MAGIC = 0xDB4775248B80FB57  # the last 8 bytes of an SSTable (a .index)
_FOOTER_SIZE = 48
_BLOCK_TRAILER = 5  # compression type byte + crc32
# TensorFlow DataType enum values -> numpy dtypes (DT_BFLOAT16 = 14 is read as uint16).
_TF_DTYPES = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("u1"),
    5: np.dtype("<i2"),
    6: np.dtype("i1"),
    9: np.dtype("<i8"),
    10: np.dtype("?"),
    14: np.dtype("<u2"),
    19: np.dtype("<f2"),
}


class _Malformed(Exception):
    """Raised inside the parser; turned into one CheckpointError line naming the file."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _Malformed("varint runs past the end")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed("varint too long")


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode a protobuf message into (field number, value) pairs, in order."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise _Malformed(f"unsupported protobuf wire type {wire}")
        out.append((field, value))
    if pos != len(buf):
        raise _Malformed("protobuf message runs past its end")
    return out


def _block(data: bytes, handle: bytes) -> bytes:
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    if offset + size + _BLOCK_TRAILER > len(data):
        raise _Malformed("block runs past the end of the index")
    if data[offset + size] != 0:
        raise _Malformed("compressed index blocks are not supported")
    return data[offset : offset + size]


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Entries of one SSTable block; keys are prefix-compressed against the previous one."""
    if len(block) < 4:
        raise _Malformed("block too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * num_restarts
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < end:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def read_index(index_path: Path) -> dict[bytes, bytes]:
    """All key/value pairs of an SSTable file."""
    data = Path(index_path).read_bytes()
    if len(data) < _FOOTER_SIZE:
        raise _Malformed("file too short for an SSTable footer")
    footer = data[-_FOOTER_SIZE:]
    if struct.unpack("<Q", footer[-8:])[0] != TABLE_MAGIC:
        raise _Malformed("not an SSTable (bad magic number)")
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)  # skip the metaindex handle
    index_handle = footer[pos:]
    table: dict[bytes, bytes] = {}
    for _, data_handle in _block_entries(_block(data, index_handle)):
        table.update(_block_entries(_block(data, data_handle)))
    return table


def _shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for field, dim in _proto_fields(buf):
        if field == 2:  # TensorShapeProto.dim
            size = dict(_proto_fields(dim)).get(1, 0)
            dims.append(size - (1 << 64) if size >= 1 << 63 else size)
    return tuple(dims)


def _entry(prefix: Path, num_shards: int, name: str, value: bytes) -> ByteSpan:
    fields = dict(_proto_fields(value))
    dtype_id = fields.get(1, 0)
    if dtype_id not in _TF_DTYPES:
        raise CheckpointError(f"{prefix}.index: tensor {name} has unsupported dtype {dtype_id}")
    shard = fields.get(3, 0)
    shard_file = Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")
    return ByteSpan(
        file=shard_file,
        offset=fields.get(4, 0),
        nbytes=fields.get(5, 0),
        dtype=_TF_DTYPES[dtype_id],
        shape=_shape(fields.get(2, b"")),
        bfloat16=dtype_id == 14,
    )


def open_tf_checkpoint(prefix: Path | str) -> MemmapSource:
    """Open checkpoint ``prefix`` (e.g. ``.../124M/model.ckpt``); tensors map on demand."""
    prefix = Path(prefix)
    index = Path(f"{prefix}.index")
    try:
        table = read_index(index)
        header = dict(_proto_fields(table.get(b"", b"")))
        if header.get(2, 0) != 0:
            raise _Malformed("big-endian checkpoints are not supported")
        num_shards = header.get(1, 1)
        spans = {
            key.decode("utf-8"): _entry(prefix, num_shards, key.decode("utf-8"), value)
            for key, value in table.items()
            if key
        }
    except FileNotFoundError:
        raise CheckpointError(f"{index}: file not found") from None
    except (_Malformed, struct.error, UnicodeDecodeError, TypeError, ValueError) as exc:
        # TypeError, ValueError: damaged bytes that parse as fields of the wrong kind
        raise CheckpointError(
            f"{index}: not a readable TensorFlow checkpoint index ({exc})"
        ) from None
    return MemmapSource(index, spans)


# -- writing -----------------------------------------------------------------------------------
def _put_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _put_field(num: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _put_varint(num << 3 | 2) + _put_varint(len(value)) + value
    return _put_varint(num << 3) + _put_varint(value)


def _put_block(entries: list[tuple[bytes, bytes]], restart_every: int = 1) -> bytes:
    """An SSTable block; between restart points a key keeps the prefix it shares with the
    one before it (the reader's prefix decompression)."""
    block, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_every == 0:
            restarts.append(len(block))
        else:
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        block += _put_varint(shared) + _put_varint(len(key) - shared) + _put_varint(len(value))
        block += key[shared:] + value
        prev = key
    return bytes(block) + struct.pack(f"<{len(restarts) + 1}I", *restarts, len(restarts))


def write_tf_bundle(prefix: Path | str, tensors: dict[str, np.ndarray],
                    block_entries: int | None = None) -> None:
    """Write ``tensors`` as a TF checkpoint ``prefix`` (one data shard, uncompressed index).

    ``block_entries`` splits the index into data blocks of that many entries (prefix-
    compressed, a restart every 3), as a large checkpoint's is; default: one block.
    """
    dtype_ids = {dtype: i for i, dtype in _TF_DTYPES.items() if i != 14}
    entries = [(b"", _put_field(1, 1) + _put_field(3, _put_field(1, 1)))]  # 1 shard, version
    offset = 0
    with open(f"{prefix}.data-00000-of-00001", "wb") as data:
        for name in sorted(tensors):
            arr = np.ascontiguousarray(tensors[name])
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            shape = b"".join(_put_field(2, _put_field(1, d)) for d in arr.shape)
            entries.append((name.encode(), _put_field(1, dtype_ids[arr.dtype]) + _put_field(
                2, shape) + _put_field(4, offset) + _put_field(5, arr.nbytes)))
            data.write(arr.tobytes())
            offset += arr.nbytes
    per_block = block_entries or len(entries)
    trailer = b"\0" * 5  # compression type 0 (none), crc32c (not checked)
    out, index = bytearray(), []
    for start in range(0, len(entries), per_block):
        chunk = entries[start : start + per_block]
        block = _put_block(chunk, restart_every=3)
        index.append((chunk[-1][0], _put_varint(len(out)) + _put_varint(len(block))))
        out += block + trailer
    handles = b""
    for block in (_put_block([]), _put_block(index)):  # the metaindex, then the index
        handles += _put_varint(len(out)) + _put_varint(len(block))
        out += block + trailer
    footer = handles.ljust(_FOOTER_SIZE - 8, b"\0") + struct.pack("<Q", TABLE_MAGIC)
    Path(f"{prefix}.index").write_bytes(bytes(out) + footer)
