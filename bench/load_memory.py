"""Peak RSS while loading a gpt2-medium-sized (355M) checkpoint in each format.

    PYTHONPATH=src python bench/load_memory.py [--preset gpt2-medium] [--dir /tmp/x]

Writes random weights in every format to a temporary folder (OpenAI's TF bundle with
diygpt.pretrained.tf_checkpoint.write_tf_bundle; the TF-written fixtures vouch for its reader),
then loads each in a fresh subprocess and reports the peak resident memory above the
baseline after imports: right after loading, and after one forward pass plus a
read of every weight (memory-mapped weights only count once read). The last row is the
naive route for comparison: allocate a model, ``torch.load`` the file, copy it in.

Peak RSS is read from ``VmHWM`` in /proc/self/status where it exists, not from
``ru_maxrss``: Linux carries ``ru_maxrss`` across fork+exec, so a child started by this
(large) parent would report the parent's peak and hide its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from diygpt.config import get_preset
from diygpt.pretrained import load_pretrained
from diygpt.pretrained.assemble import meta_model
from diygpt.pretrained.tf_checkpoint import write_tf_bundle

_CHILD = r"""
import sys, torch
from pathlib import Path
from diygpt.model import GPTModel
from diygpt.pretrained import load_pretrained
from diygpt.pretrained.book import book_config
from diygpt.pretrained.readers import open_file
from diygpt.cli.prepare import peak_rss_mb as rss  # VmHWM (see the module docstring)
path, dtype, naive = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
base = rss()
if naive:
    model = GPTModel(book_config(open_file(path), Path(path).parent / "config.json"))
    model.load_state_dict(torch.load(path, weights_only=True))
else:
    model = load_pretrained(path, dtype=dtype)
loaded = rss()
with torch.no_grad():
    model(torch.zeros(1, 1, dtype=torch.long))
    for p in model.parameters():  # a forward reads one embedding row: read every weight
        p.sum()
unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
print(sum(unique.values()) / 2**20, loaded - base, rss() - base)
"""


def random_openai(preset: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    cfg = get_preset(preset)
    d, rng = cfg.emb_dim, np.random.default_rng(0)
    shapes = {"model/wte": (cfg.vocab_size, d), "model/wpe": (cfg.context_length, d)}
    shapes.update({"model/ln_f/g": (d,), "model/ln_f/b": (d,)})
    for i in range(cfg.n_layers):
        p = f"model/h{i}/"
        for part, shape in {
            "ln_1/g": (d,), "ln_1/b": (d,), "ln_2/g": (d,), "ln_2/b": (d,),
            "attn/c_attn/w": (1, d, 3 * d), "attn/c_attn/b": (3 * d,),
            "attn/c_proj/w": (1, d, d), "attn/c_proj/b": (d,),
            "mlp/c_fc/w": (1, d, 4 * d), "mlp/c_fc/b": (4 * d,),
            "mlp/c_proj/w": (1, 4 * d, d), "mlp/c_proj/b": (d,),
        }.items():  # fmt: skip
            shapes[p + part] = shape
    tensors = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()}
    hparams = {"n_vocab": cfg.vocab_size, "n_ctx": cfg.context_length, "n_embd": d}
    hparams.update({"n_head": cfg.n_heads, "n_layer": cfg.n_layers})
    return tensors, hparams


def write_all(preset: str, root: Path) -> dict[str, Path]:
    tensors, hparams = random_openai(preset)
    openai = root / "openai"
    openai.mkdir()
    write_tf_bundle(openai / "model.ckpt", tensors)
    (openai / "hparams.json").write_text(json.dumps(hparams))
    del tensors
    model = load_pretrained(openai)
    hf = root / "hf"
    hf.mkdir()
    sd = {}  # Hugging Face's hub layout: Conv1D [in, out], fused c_attn, no prefix
    for i, block in enumerate(model.trf_blocks):
        p, att = f"h.{i}.", block.att
        qkv = (att.W_query, att.W_key, att.W_value)
        sd[p + "attn.c_attn.weight"] = torch.cat([m.weight.T for m in qkv], dim=1)
        sd[p + "attn.c_attn.bias"] = torch.cat([m.bias for m in qkv])
        sd[p + "attn.c_proj.weight"] = att.out_proj.weight.T.contiguous()
        sd[p + "attn.c_proj.bias"] = att.out_proj.bias
        for j, name in ((0, "c_fc"), (2, "c_proj")):
            sd[p + f"mlp.{name}.weight"] = block.ff.layers[j].weight.T.contiguous()
            sd[p + f"mlp.{name}.bias"] = block.ff.layers[j].bias
        for n, ln in (("ln_1", block.norm1), ("ln_2", block.norm2)):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = ln.scale, ln.shift
    sd.update({"wte.weight": model.tok_emb.weight, "wpe.weight": model.pos_emb.weight})
    sd.update({"ln_f.weight": model.final_norm.scale, "ln_f.bias": model.final_norm.shift})
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    save_file(sd, hf / "model.safetensors")
    torch.save(sd, hf / "pytorch_model.bin")
    del sd
    hf_keys = ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")
    (hf / "config.json").write_text(json.dumps(dict(zip(hf_keys, hparams.values(), strict=True))))
    book = root / "book"
    book.mkdir()
    (book / "config.json").write_text(json.dumps(model.cfg.to_dict()))
    untied = {k: v.detach().clone() for k, v in model.state_dict().items()}
    untied["out_head.weight"] = untied["out_head.weight"].clone()  # safetensors cannot share
    save_file(untied, book / "model.safetensors")
    torch.save(model.state_dict(), book / "model.pth")
    return {
        "openai (TF bundle)": openai,
        "hf model.safetensors": hf,
        "hf pytorch_model.bin": hf / "pytorch_model.bin",
        "book .pth": book / "model.pth",
        "book .safetensors": book / "model.safetensors",
    }


def measure(path: Path, dtype: str, naive: bool = False) -> tuple[float, float, float]:
    """(MB of the loaded model's distinct weights, peak RSS delta after load, after forward)."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), dtype, "1" if naive else "0"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    weights_mb, loaded, forward = map(float, out.stdout.split())
    return weights_mb, loaded, forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-medium")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    n_params = meta_model(get_preset(args.preset)).num_parameters(exclude_out_head=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = write_all(args.preset, Path(tmp))
        rows = [(name, path, "fp32", False) for name, path in paths.items()]
        rows += [
            (name, paths[name], "bf16", False)
            for name in ("openai (TF bundle)", "hf model.safetensors")
        ]
        rows.append(
            ("naive: book .pth, torch.load + load_state_dict", paths["book .pth"], "fp32", True)
        )
        print(f"{args.preset}: {n_params / 1e6:.0f}M parameters (tied head counted once)")
        print(
            "| format | dtype | weights MB | peak RSS delta, load MB | + forward, all weights read, MB | ratio |"
        )
        print("|---|---|---:|---:|---:|---:|")
        for name, path, dtype, naive in rows:
            weights_mb, loaded, forward = measure(path, dtype, naive)
            ratio = max(loaded, forward) / weights_mb
            print(
                f"| {name} | {dtype} | {weights_mb:.0f} | {loaded:.0f} | {forward:.0f} | {ratio:.2f} |"
            )


if __name__ == "__main__":
    main()
