import pytest

from diygpt.config import PRESETS, GPTConfig, as_config, get_preset
from diygpt.errors import ConfigError

BOOK_DICT = {
    "vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12,
    "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False,
}


def test_book_preset_is_the_seed_config():
    cfg = get_preset("book-124m")
    assert {k: getattr(cfg, k) for k in BOOK_DICT} == BOOK_DICT
    assert GPTConfig.from_dict(BOOK_DICT) == cfg


@pytest.mark.parametrize(
    "name,emb,layers,heads",
    [("gpt2-small", 768, 12, 12), ("gpt2-medium", 1024, 24, 16),
     ("gpt2-large", 1280, 36, 20), ("gpt2-xl", 1600, 48, 25)],
)
def test_gpt2_presets(name, emb, layers, heads):
    cfg = PRESETS[name]
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (emb, layers, heads)
    assert cfg.context_length == 1024 and cfg.qkv_bias is True and cfg.vocab_size == 50257
    assert cfg.drop_rate == 0.0  # OpenAI's weights were released for inference


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"emb_dim": 100, "n_heads": 12}, "divisible"),
        ({"n_layers": 0}, "positive"),
        ({"vocab_size": -5}, "positive"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"attn_impl": "flash9"}, "attn_impl"),
        ({"qkv_bias": "yes"}, "qkv_bias"),
    ],
)
def test_invalid_configs_are_refused_with_a_clear_message(changes, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**{**BOOK_DICT, **changes})


def test_unknown_key_and_unknown_preset():
    with pytest.raises(ConfigError, match="unknown config key"):
        GPTConfig.from_dict({**BOOK_DICT, "n_embd": 3})
    with pytest.raises(ConfigError, match="unknown preset 'gpt3'"):
        get_preset("gpt3")


def test_a_shape_key_left_out_is_an_error_not_a_default():
    partial = {k: v for k, v in BOOK_DICT.items() if k != "context_length"}
    with pytest.raises(ConfigError, match="missing: context_length"):
        GPTConfig.from_dict(partial)  # not a silent 1024 where the seed has 256
    # drop_rate, qkv_bias and diygpt's attn_impl may take their defaults
    rest = {k: v for k, v in BOOK_DICT.items() if k not in ("drop_rate", "qkv_bias")}
    assert GPTConfig.from_dict(rest) == GPTConfig(**rest)


def test_as_config_accepts_all_forms_and_roundtrips():
    cfg = get_preset("tiny")
    assert as_config("tiny") == cfg == as_config(cfg) == as_config(cfg.to_dict())
    assert cfg.with_updates(n_layers=3, drop_rate=None).n_layers == 3


def test_numpy_scalars_are_accepted_and_stored_as_python_values():
    np = pytest.importorskip("numpy")
    cfg = GPTConfig(**{**BOOK_DICT, "emb_dim": np.int64(768), "drop_rate": np.float64(0.1),
                       "qkv_bias": np.bool_(True)})
    assert cfg == GPTConfig(**{**BOOK_DICT, "qkv_bias": True})
    assert type(cfg.emb_dim) is int and type(cfg.qkv_bias) is bool
    for bad in ({"emb_dim": np.bool_(True)}, {"drop_rate": np.bool_(False)}):
        with pytest.raises(ConfigError):
            GPTConfig(**{**BOOK_DICT, **bad})
