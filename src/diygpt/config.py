"""Model configuration: a self-validating dataclass with the book's names and named presets."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from diygpt.errors import ConfigError

ATTENTION_IMPLS = ("sdpa", "eager")
_SHAPE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")


def _is_bool(value: object) -> bool:
    # numpy's bool (np.bool_; np.bool in numpy 2), recognised without importing numpy
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT-2 style model, using the book's key names.

    ``attn_impl`` picks the attention kernel: ``eager`` is the book's math step for step
    (bit-exact with the book's code); ``sdpa`` calls PyTorch's fused
    ``scaled_dot_product_attention`` and is the default because it is faster.

    The defaults are a context-1024 GPT-2 without q/k/v bias, which is neither the seed's
    ``book-124m`` (context 256) nor ``gpt2-small`` (q/k/v bias): start from a preset.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        # numpy's scalars (np.int64 from a loaded array, np.float32, np.bool_) are accepted
        # as the rest of the API accepts them, and stored as plain Python values for JSON.
        for name in _SHAPE_KEYS:
            value = getattr(self, name)
            if _is_bool(value) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.emb_dim % self.n_heads != 0:
            raise ConfigError(
                f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        rate = self.drop_rate
        if _is_bool(rate) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
            raise ConfigError(f"drop_rate must be a number with 0 <= drop_rate < 1, got {rate!r}")
        object.__setattr__(self, "drop_rate", float(rate))
        if not _is_bool(self.qkv_bias):
            raise ConfigError(f"qkv_bias must be true or false, got {self.qkv_bias!r}")
        object.__setattr__(self, "qkv_bias", bool(self.qkv_bias))
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"attn_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attn_impl!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPTConfig:
        """Build from the book's dict (``GPT_CONFIG_124M``) or from :meth:`to_dict` output."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        # A shape filled in silently (context_length 1024 where the seed has 256) would make
        # another model; drop_rate, qkv_bias (a weights file without its biases says so) and
        # diygpt's attn_impl may take their defaults.
        missing = [k for k in _SHAPE_KEYS if k not in d]
        if missing:
            raise ConfigError(f"config key(s) missing: {', '.join(missing)} (a model's shape "
                              f"needs {', '.join(_SHAPE_KEYS)})")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_updates(self, **changes: Any) -> GPTConfig:
        """A copy with some fields changed, validated again."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _gpt2(emb_dim: int, n_layers: int, n_heads: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=50257,
        context_length=1024,
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_layers=n_layers,
        drop_rate=0.0,
        qkv_bias=True,
    )


PRESETS: dict[str, GPTConfig] = {
    # The seed's GPT_CONFIG_124M: GPT-2 small shape, trained from scratch at context 256.
    "book-124m": GPTConfig(
        vocab_size=50257,
        context_length=256,
        emb_dim=768,
        n_heads=12,
        n_layers=12,
        drop_rate=0.1,
        qkv_bias=False,
    ),
    "gpt2-small": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    # Small enough that tests and quick runs train in seconds on two CPU cores.
    "tiny": GPTConfig(
        vocab_size=50257,
        context_length=64,
        emb_dim=64,
        n_heads=4,
        n_layers=2,
        drop_rate=0.0,
        qkv_bias=False,
    ),
}


def get_preset(name: str) -> GPTConfig:
    """A named config from :data:`PRESETS`; a one-line ConfigError names the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None


def as_config(cfg: GPTConfig | Mapping[str, Any] | str) -> GPTConfig:
    """Accept a GPTConfig, the book's dict, or a preset name."""
    if isinstance(cfg, GPTConfig):
        return cfg
    if isinstance(cfg, str):
        return get_preset(cfg)
    return GPTConfig.from_dict(cfg)
