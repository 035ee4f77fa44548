"""Lazy, name-addressed access to the tensors of one weights file.

Every format reader returns a :class:`TensorSource`. Tensors come out as views of a
memory map, so nothing is read until a tensor is used, and each tensor is checked
(present, expected shape, bytes really in the file) with an error that names the file
and the tensor. Formats with a plain byte layout (TF tensor bundles, safetensors) map
each tensor on its own, so its pages leave memory as soon as its converted copy exists.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diygpt.errors import CheckpointError

if TYPE_CHECKING:  # torch is imported where a tensor is made: `diygpt download` reads
    import torch  # headers only, and starts without torch's 1.5 s and 190 MB


class TensorSource:
    """The tensors of one file (or bundle), by name, with their shapes known up front."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.used: set[str] = set()  # what get() handed out: the rest is left over

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def get(self, name: str, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The tensor ``name``, a lazy view when the format allows; checks presence and shape."""
        if name not in self:
            raise self.error(f"tensor {name} is missing")
        actual = tuple(self.shape(name))
        if shape is not None and actual != tuple(shape):
            raise self.error(f"tensor {name} has shape {list(actual)}, expected {list(shape)}")
        self.used.add(name)
        return self._load(name)


@dataclass(frozen=True)
class ByteSpan:
    """Where one tensor's raw little-endian bytes sit in a file."""

    file: Path
    offset: int
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]
    bfloat16: bool = False  # numpy has no bfloat16: the bytes are read as uint16


class MemmapSource(TensorSource):
    """Tensors stored as raw bytes at known offsets, each mapped separately and lazily."""

    def __init__(self, path: Path, spans: Mapping[str, ByteSpan]) -> None:
        super().__init__(path)
        self.spans = dict(spans)
        self._sizes: dict[Path, int] = {}

    def names(self) -> list[str]:
        return list(self.spans)

    def __contains__(self, name: str) -> bool:
        return name in self.spans

    def shape(self, name: str) -> tuple[int, ...]:
        return self.spans[name].shape

    def _file_size(self, file: Path) -> int:
        if file not in self._sizes:
            try:
                self._sizes[file] = os.path.getsize(file)
            except OSError as exc:
                raise CheckpointError(f"{file}: cannot read ({exc.strerror})") from None
        return self._sizes[file]

    def _load(self, name: str) -> torch.Tensor:
        span = self.spans[name]
        count = int(np.prod(span.shape, dtype=np.int64))
        if count * span.dtype.itemsize != span.nbytes:
            raise self.error(
                f"tensor {name}: {span.nbytes} bytes do not hold shape {list(span.shape)}"
            )
        if span.offset + span.nbytes > self._file_size(span.file):
            raise CheckpointError(
                f"{span.file}: tensor {name} lies past the end of the file "
                "(truncated or incomplete download?)"
            )
        if count == 0:
            array = np.zeros(span.shape, dtype=span.dtype)
        else:
            # Copy-on-write map: writable for torch, yet the file is never modified.
            array = np.memmap(span.file, span.dtype, "c", span.offset, span.shape)
            if span.offset % span.dtype.itemsize:  # misaligned bytes: torch needs a copy
                array = np.array(array)
        import torch

        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if span.bfloat16 else tensor


class DictSource(TensorSource):
    """Tensors already held by a dict, e.g. from ``torch.load(..., mmap=True)``."""

    def __init__(self, path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__(path)
        self.tensors = dict(tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def _load(self, name: str) -> torch.Tensor:
        return self.tensors[name]
