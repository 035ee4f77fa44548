"""Loading errors are one line naming the file and the tensor; nothing loads half-way."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diygpt.errors import CheckpointError, ConfigError
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


def test_hugging_face_files_are_strict_too(tmp_path):
    # A classifier's head is not GPT2LMHeadModel's file: refused unless strict=False.
    path = _hf_copy(tmp_path, lambda sd: sd.update({"score.weight": torch.zeros(2, 32)}))
    assert "unexpected tensor score.weight (1 in all" in _error(path)
    assert load_pretrained(path, strict=False).cfg.n_layers == 2
    # The causal-mask buffers some transformers versions save are not extra weights.
    path = _hf_copy(tmp_path, lambda sd: sd.update({"transformer.h.0.attn.bias": torch.ones(1)}))
    assert load_pretrained(path).cfg.n_layers == 2


@pytest.mark.parametrize("strict", [True, False])
def test_a_config_with_fewer_layers_than_the_file_is_refused(tmp_path, strict):
    # e.g. a smaller model's config.json beside the weights: never load part of the file
    _hf_copy(tmp_path, lambda sd: None)
    (tmp_path / "config.json").write_text(
        (HF_DIR / "config.json").read_text().replace('"n_layer": 2', '"n_layer": 1'))
    assert "holds 2 layers, but its config says n_layers 1" in _error(tmp_path, strict=strict)
    openai = shutil.copytree(OPENAI_DIR, tmp_path / "openai")
    (openai / "hparams.json").write_text(
        (OPENAI_DIR / "hparams.json").read_text().replace('"n_layer": 2', '"n_layer": 1'))
    assert "holds 2 layers" in _error(openai, strict=strict)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.",
                                    "_orig_mod.module."])
def test_a_compiled_or_ddp_models_state_dict_loads(tmp_path, prefix):
    # The book's torch.save(model.state_dict()) after torch.compile or DDP, in either order
    import json

    model = load_pretrained(OPENAI_DIR)
    (tmp_path / "config.json").write_text(json.dumps(model.cfg.to_dict()))  # emb_dim 32
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "model.pth")
    loaded = load_pretrained(tmp_path / "model.pth")
    assert all(torch.equal(a, b) for a, b in
               zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))
    save_file({prefix + k: v.clone() for k, v in model.state_dict().items()},
              tmp_path / "model.safetensors")
    assert load_pretrained(tmp_path / "model.safetensors").cfg == loaded.cfg


@pytest.mark.parametrize("field,value", [("activation_function", "relu"),
                                         ("scale_attn_by_inverse_layer_idx", True),
                                         ("layer_norm_epsilon", 1e-6)])
def test_a_config_with_other_arithmetic_is_refused(tmp_path, field, value):
    import json

    path = _hf_copy(tmp_path, lambda sd: None)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    assert f"{field} {value!r} is not GPT-2's" in _error(path)


def test_a_run_folder_given_as_weights_takes_its_own_config(tmp_path):
    # A run's heads are not always GPT-2's for its width: state.json says, not the shapes.
    from diygpt import GPTModel
    from diygpt.checkpoints import load_model, save_run

    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 500, "context_length": 16, "emb_dim": 48, "n_heads": 3,
                      "n_layers": 1, "drop_rate": 0.0, "qkv_bias": False})
    save_run(tmp_path, model, torch.optim.AdamW(model.parameters()), {"config": model.cfg.to_dict()})
    loaded = load_pretrained(tmp_path)
    assert loaded.cfg.n_heads == 3
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(x), load_model(tmp_path)(x))


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_a_sharded_hugging_face_checkpoint_loads_as_one_file(tmp_path, kind):
    import json

    whole = load_pretrained(HF_DIR)
    sd = load_file(HF_DIR / "model.safetensors")
    names = sorted(sd)
    halves = {"00001": names[: len(names) // 2], "00002": names[len(names) // 2 :]}
    stem, index = (("model", "model.safetensors.index.json") if kind == "safetensors"
                   else ("pytorch_model", "pytorch_model.bin.index.json"))
    weight_map = {}
    for part, keys in halves.items():
        file = f"{stem}-{part}-of-00002.{kind}"
        shard = {k: sd[k] for k in keys}
        if kind == "safetensors":
            save_file(shard, tmp_path / file)
        else:
            torch.save(shard, tmp_path / file)
        weight_map.update(dict.fromkeys(keys, file))
    shutil.copy(HF_DIR / "config.json", tmp_path)
    (tmp_path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for given in (tmp_path, tmp_path / index):
        loaded = load_pretrained(given)
        assert loaded.cfg == whole.cfg
        assert all(torch.equal(a, b) for a, b in
                   zip(loaded.state_dict().values(), whole.state_dict().values(), strict=True))
    (tmp_path / f"{stem}-00002-of-00002.{kind}").unlink()
    assert f"shard {stem}-00002-of-00002.{kind} is missing (1 of 2)" in _error(tmp_path)


def test_a_named_tf_index_is_the_checkpoint_loaded(tmp_path):
    # A fine-tuning run keeps several checkpoints; `checkpoint` names its newest
    from diygpt.pretrained.tf_checkpoint import open_tf_checkpoint, write_tf_bundle

    folder = tmp_path / "ft"
    shutil.copytree(OPENAI_DIR, folder)
    source = open_tf_checkpoint(folder / "model.ckpt")
    later = {n: source.get(n).numpy().copy() for n in source.names()}
    later["model/wte"] = later["model/wte"] * 0 + 1.0
    write_tf_bundle(folder / "model-1000", later)
    (folder / "checkpoint").write_text('model_checkpoint_path: "model-1000"\n')
    first = source.get("model/wte")
    assert torch.equal(load_pretrained(folder / "model.ckpt.index").tok_emb.weight, first)
    assert load_pretrained(folder).tok_emb.weight.eq(1.0).all()  # the folder: `checkpoint`'s
    for name in ("checkpoint", "model.ckpt.index"):
        (folder / name).unlink()
    assert load_pretrained(folder / "model-1000.index").tok_emb.weight.eq(1.0).all()
    (folder / "hparams.json").unlink()
    with pytest.raises(CheckpointError, match="needs the hparams.json"):
        load_pretrained(folder / "model-1000.index")


@pytest.mark.parametrize("offsets", [lambda b, e, n: [str(b), str(e)],
                                     lambda b, e, n: [-8 - n, e - b - 8 - n]])
def test_safetensors_offsets_outside_the_data_are_refused(tmp_path, offsets):
    # strings, or offsets that would read the header's own bytes as weights
    import json
    import struct

    raw = (HF_DIR / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k.endswith("wte.weight"))
    header[key]["data_offsets"] = offsets(*header[key]["data_offsets"], n)
    text = json.dumps(header).encode()
    shutil.copy(HF_DIR / "config.json", tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    assert "has an unreadable or unsupported header entry" in _error(path)


@pytest.mark.parametrize("flips", [  # found by a reviewer's fuzzing: fields of the wrong kind
    [(285, 217), (352, 17), (391, 75), (418, 94)], [(491, 81), (795, 26)]])
def test_a_damaged_tf_index_is_one_line(tmp_path, flips):
    folder = shutil.copytree(OPENAI_DIR, tmp_path / "m")
    damaged = bytearray((OPENAI_DIR / "model.ckpt.index").read_bytes())
    for at, value in flips:
        damaged[at] = value
    (folder / "model.ckpt.index").write_bytes(bytes(damaged))
    assert "not a readable TensorFlow checkpoint index" in _error(folder)


def test_a_hugging_face_file_without_positions_is_one_line(tmp_path):
    sd = load_file(HF_DIR / "model.safetensors")
    sd = {k: v for k, v in sd.items() if not k.endswith("wpe.weight")}
    save_file(sd, tmp_path / "model.safetensors")
    assert "wpe.weight is missing" in _error(tmp_path / "model.safetensors")


def test_weights_with_a_preset_read_a_bare_book_file_in_that_shape(tmp_path, capsys):
    # the head count cannot be read from the tensors: the typed preset gives it
    from diygpt.cli.main import main
    from diygpt.config import get_preset
    from diygpt.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel(get_preset("tiny")).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    argv = ["generate", "--weights", str(tmp_path / "tiny.pth"), "--prompt", "Every effort",
            "--max-new-tokens", "5", "--device", "cpu"]
    assert main(argv) == 2
    assert "cannot tell n_heads for emb_dim 64; put a config.json next to the weights, or give " \
        "its shape with --preset NAME" in capsys.readouterr().err
    assert main([*argv, "--preset", "tiny"]) == 0
    by_preset = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(tmp_path / "tiny.pth"), "--preset", "tiny",
                 *argv[3:]]) == 0
    assert capsys.readouterr().out == by_preset


def test_a_book_file_beside_hugging_faces_config_takes_that_shape(tmp_path):
    # a download folder holding both formats (diygpt download --format hf, the book's .pth)
    reference = load_pretrained(HF_DIR)
    torch.save(reference.state_dict(), tmp_path / "gpt2-small-124M.pth")
    shutil.copy(HF_DIR / "config.json", tmp_path)
    loaded = load_pretrained(tmp_path / "gpt2-small-124M.pth")
    assert loaded.cfg == reference.cfg
    ids = torch.randint(0, reference.cfg.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), reference(ids))


def test_an_unfinished_openai_download_does_not_hide_other_weights(tmp_path):
    folder = shutil.copytree(OPENAI_DIR, tmp_path / "both")
    shard = folder / "model.ckpt.data-00000-of-00001"
    shard.rename(shard.with_name(shard.name + ".part"))  # the download was cut here
    assert "an unfinished download (model.ckpt.data-00000-of-00001.part)" in _error(folder)
    shutil.copy(HF_DIR / "model.safetensors", folder)
    shutil.copy(HF_DIR / "config.json", folder)
    assert load_pretrained(folder).cfg == load_pretrained(HF_DIR).cfg
    alone = shutil.copytree(OPENAI_DIR, tmp_path / "alone")
    (alone / "model.ckpt.data-00000-of-00001").unlink()
    assert "its data file (model.ckpt.data-00000-of-...) is missing" in _error(alone)


def test_a_config_beside_the_file_gives_the_shape_and_a_clashing_preset_is_one_line(tmp_path):
    import json

    from diygpt.cli.main import build_parser
    from diygpt.cli.options import load_model_from_args
    from diygpt.config import get_preset
    from diygpt.model import GPTModel

    torch.manual_seed(0)
    cfg = get_preset("tiny").with_updates(n_heads=2, drop_rate=0.0)  # the preset has 4
    model = GPTModel(cfg).eval()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    argv = ["generate", "--weights", str(tmp_path / "model.pth"), "--attn", "eager"]
    parse = build_parser().parse_args
    loaded = load_model_from_args(parse(argv), torch.device("cpu"))
    assert loaded.cfg.n_heads == 2 and loaded.cfg.attn_impl == "eager"
    # Before, the typed preset was dropped without a word.
    with pytest.raises(ConfigError, match="n_heads is 2, --preset tiny's is 4 .*drop --preset"):
        load_model_from_args(parse([*argv, "--preset", "tiny"]), torch.device("cpu"))
    (tmp_path / "config.json").unlink()  # bare: the preset's shape, and still --attn's kernel
    loaded = load_model_from_args(parse([*argv, "--preset", "tiny"]), torch.device("cpu"))
    assert loaded.cfg.n_heads == 4 and loaded.cfg.attn_impl == "eager"


@pytest.mark.parametrize("source", ["--weights", "--pretrained"])
def test_a_preset_of_another_size_than_the_weights_is_one_line(tmp_path, monkeypatch, capsys,
                                                                source):
    from cli_helpers import one_line_error

    from diygpt.pretrained import catalog

    for name in catalog.GPT2_SHAPES:  # the fixture stands in for gpt2-small
        monkeypatch.setitem(catalog.GPT2_SHAPES, name, (32, 2))
    monkeypatch.setenv("DIYGPT_HOME", str(tmp_path))
    shutil.copytree(HF_DIR, tmp_path / "models" / "gpt2-small")
    where = str(HF_DIR) if source == "--weights" else "gpt2-small"
    line = one_line_error(capsys, "generate", source, where, "--preset", "book-124m",
                          "--prompt", "x", "--max-new-tokens", "1")
    assert "emb_dim is 32, --preset book-124m's is 768" in line


def test_a_damaged_download_says_to_delete_it_and_download_again(tmp_path, monkeypatch, capsys):
    # the next `diygpt download` skips a file in place, so the error says what to do
    from diygpt.cli.main import main

    monkeypatch.setenv("DIYGPT_HOME", str(tmp_path))
    folder = tmp_path / "models" / "gpt2-small"
    folder.mkdir(parents=True)
    import json

    config = json.loads((HF_DIR / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 768, "n_layer": 12}))
    (folder / "model.safetensors").write_bytes(b"<html>a proxy's page</html>")
    hint = f"if the download went wrong, delete {folder} and run `diygpt download gpt2-small` again"
    assert hint in _error("gpt2-small")
    assert main(["generate", "--pretrained", "gpt2-small", "--prompt", "a"]) == 2
    assert hint in capsys.readouterr().err
    copy = shutil.copytree(folder, tmp_path / "mine")  # not a download folder: no such hint
    assert "diygpt download" not in _error(copy)
