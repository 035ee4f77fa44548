"""Let backward recompute chosen activations instead of autograd keeping them.

Activation checkpointing (``torch.utils.checkpoint``) reruns a whole region, matrix
products included. Here only tensors that are cheap to make again are dropped: forward code
calls :func:`mark` on such a tensor with a :class:`Recipe` that makes it again from inputs
autograd keeps anyway (a LayerNorm's input, GELU's input, a softmax output and a dropout
mask). While :func:`recomputing` is active, autograd's saved-tensor pack hook swaps every
saved tensor that lives in a marked tensor's storage (the tensor itself or a view, such as
the 2-D view a linear layer saves of its 3-D input) for the recipe and the view's geometry;
the unpack hook in backward runs the recipe once and serves every view of it.

The autograd graph is unchanged, so gradients are summed in the same order, and a recipe
runs the same ops on the same inputs as the forward pass did: gradients are bit for bit the
same (tests/test_lean.py). Parameters a recipe reads are not yet updated when it runs, even
when AdamW steps inside backward: a module's output is only needed by the backward of its
consumers, which runs before the module's own parameters get their gradient.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch


class Recipe:
    """``fn(*args)`` under no_grad, run at most once per backward pass; a tuple of tensors.

    The tensors among ``args`` are held weakly until a saved reference needs the recipe
    (:meth:`hold`), so a recipe that no op keeps (a dropout whose output only feeds the
    residual sum, or any mark inside ``torch.utils.checkpoint``) keeps nothing alive.
    ``uses`` counts the saved references (and :meth:`take_cached` callers) still to be
    served, so the result is freed after the last.
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], *args: object) -> None:
        self.fn = fn
        self._weak = tuple(weakref.ref(a) if isinstance(a, torch.Tensor) else a for a in args)
        self.args: tuple[object, ...] | None = None
        self.uses = 0
        self._value: tuple[torch.Tensor, ...] | None = None

    def hold(self) -> bool:
        """Hold the inputs from now on; False if one is gone already.

        An input that is itself marked (a softmax output that dropout's recipe reads) is
        held as its recipe, so that it need not stay alive either.
        """
        if self.args is None:
            args = tuple(a() if isinstance(a, weakref.ref) else a for a in self._weak)
            if any(a is None for a, w in zip(args, self._weak, strict=True)
                   if isinstance(w, weakref.ref)):
                return False
            self.args = tuple(_made_by(a, outer=self) or a if isinstance(a, torch.Tensor) else a
                              for a in args)
        return True

    def take(self) -> tuple[torch.Tensor, ...]:
        value = self._value
        if value is None:
            args = tuple(a.get() if isinstance(a, _Made) else a for a in self.args)
            with torch.no_grad():
                value = self.fn(*args)
        self.uses -= 1
        self._value = value if self.uses > 0 else None
        return value

    def take_cached(self) -> tuple[torch.Tensor, ...] | None:
        """Like :meth:`take` if a saved reference already made the result, else None."""
        if self._value is None:
            self.uses -= 1
            return None
        return self.take()


# storage address -> (weak reference to the marked tensor, its version then, recipe, index)
_marks: dict[int, tuple[weakref.ref, int, Recipe, int]] = {}
_active = 0


def recipe(fn: Callable[..., tuple[torch.Tensor, ...]], *args: object) -> Recipe | None:
    """A :class:`Recipe` while :func:`recomputing` is active, else None (nothing to mark)."""
    return Recipe(fn, *args) if _active else None


def mark(tensor: torch.Tensor, recipe: Recipe | None, index: int = 0) -> None:
    """If autograd saves ``tensor`` (or a view of it), keep ``recipe`` instead.

    ``recipe.take()[index]`` must equal ``tensor`` bit for bit, contiguous. A no-op unless
    :func:`recomputing` is active (inside an autograd Function's forward too, where grad
    mode is off) and ``recipe`` is not None.
    """
    if not _active or recipe is None or tensor.numel() == 0:
        return
    if not tensor.is_contiguous() or tensor.storage_offset() != 0:
        return
    ptr = tensor.untyped_storage().data_ptr()

    def forget(ref: weakref.ref, ptr: int = ptr) -> None:
        # the storage may already carry a newer mark: only drop our own
        if ptr in _marks and _marks[ptr][0] is ref:
            del _marks[ptr]

    _marks[ptr] = (weakref.ref(tensor, forget), tensor._version, recipe, index)


class _Made(NamedTuple):
    """A tensor (or a view of it) to be made again: ``recipe.take()[index]``'s geometry."""

    recipe: Recipe
    index: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int

    def get(self) -> torch.Tensor:
        return self.recipe.take()[self.index].as_strided(self.size, self.stride, self.offset)


def _made_by(tensor: torch.Tensor, outer: Recipe | None = None) -> _Made | None:
    """How to make ``tensor`` again if it lives in a marked storage (one more use), else None."""
    try:
        entry = _marks.get(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
        return None
    if entry is None:
        return None
    ref, version, recipe, index = entry
    marked = ref()
    # alive means the storage is still the marked one; an in-place change since forbids it
    if (marked is None or marked._version != version or marked.dtype != tensor.dtype
            or recipe is outer or not recipe.hold()):
        return None
    recipe.uses += 1
    return _Made(recipe, index, tensor.size(), tensor.stride(), tensor.storage_offset())


def _pack(saved: torch.Tensor) -> object:
    return (_made_by(saved) if _marks else None) or saved


def _unpack(packed: object) -> torch.Tensor:
    return packed.get() if isinstance(packed, _Made) else packed


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Within: marked tensors that autograd saves are recomputed in backward."""
    global _active
    _active += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _active -= 1
        if not _active:
            _marks.clear()
