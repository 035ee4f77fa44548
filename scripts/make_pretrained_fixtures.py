"""Write the tiny GPT-2 fixtures used by tests/test_pretrained_*.py.

Run once with a separate environment that has TensorFlow (never a diygpt dependency):

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu numpy transformers torch
    /tmp/tfvenv/bin/python scripts/make_pretrained_fixtures.py

It draws one set of random weights and writes them twice, each by the format's own
tooling: OpenAI's release format with TensorFlow's Saver under OpenAI's variable names and
shapes (``model/h0/attn/c_attn/w`` is [1, d, 3d]), and Hugging Face's format with
``GPT2LMHeadModel.save_pretrained`` (model.safetensors) plus a pytorch_model.bin. It also
runs GPT-2's forward pass in TensorFlow (OpenAI's model.py math) and in transformers on a
fixed input and stores both logits, so tests can compare against either.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures"
HP = {"n_vocab": 500, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}
INPUT_IDS = [[17, 301, 5, 499, 42, 0, 250, 123]]
GREEDY_STEPS = 8


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, v, c = HP["n_embd"], HP["n_vocab"], HP["n_ctx"]

    def rnd(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"model/wte": rnd(v, d), "model/wpe": rnd(c, d, scale=0.05)}
    for i in range(HP["n_layer"]):
        p = f"model/h{i}/"
        for ln in ("ln_1", "ln_2"):
            w[p + ln + "/g"] = 1.0 + rnd(d, scale=0.1)
            w[p + ln + "/b"] = rnd(d, scale=0.1)
        w[p + "attn/c_attn/w"] = rnd(1, d, 3 * d)
        w[p + "attn/c_attn/b"] = rnd(3 * d, scale=0.1)
        w[p + "attn/c_proj/w"] = rnd(1, d, d)
        w[p + "attn/c_proj/b"] = rnd(d, scale=0.1)
        w[p + "mlp/c_fc/w"] = rnd(1, d, 4 * d)
        w[p + "mlp/c_fc/b"] = rnd(4 * d, scale=0.1)
        w[p + "mlp/c_proj/w"] = rnd(1, 4 * d, d)
        w[p + "mlp/c_proj/b"] = rnd(d, scale=0.1)
    w["model/ln_f/g"] = 1.0 + rnd(d, scale=0.1)
    w["model/ln_f/b"] = rnd(d, scale=0.1)
    return w


def tf_forward(tf, v: dict, ids: np.ndarray):
    """GPT-2's forward pass as in OpenAI's gpt-2/src/model.py, on TF variables ``v``."""
    nh, d = HP["n_head"], HP["n_embd"]

    def norm(x, p):
        u = tf.reduce_mean(x, axis=-1, keepdims=True)
        s = tf.reduce_mean(tf.square(x - u), axis=-1, keepdims=True)
        return (x - u) * tf.math.rsqrt(s + 1e-5) * v[p + "/g"] + v[p + "/b"]

    def conv1d(x, p):
        return tf.einsum("bti,io->bto", x, v[p + "/w"][0]) + v[p + "/b"]

    def gelu(x):
        return 0.5 * x * (1 + tf.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * tf.pow(x, 3))))

    def heads(x):
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        return tf.transpose(tf.reshape(x, [b, t, nh, d // nh]), [0, 2, 1, 3])

    t = ids.shape[1]
    h = tf.gather(v["model/wte"], ids) + v["model/wpe"][:t]
    mask = tf.linalg.band_part(tf.ones([t, t]), -1, 0)
    for i in range(HP["n_layer"]):
        p = f"model/h{i}/"
        q, k, val = tf.split(conv1d(norm(h, p + "ln_1"), p + "attn/c_attn"), 3, axis=2)
        q, k, val = heads(q), heads(k), heads(val)
        w = tf.matmul(q, k, transpose_b=True) * tf.math.rsqrt(float(d // nh))
        w = tf.nn.softmax(w * mask - 1e10 * (1 - mask), axis=-1)
        a = tf.reshape(tf.transpose(tf.matmul(w, val), [0, 2, 1, 3]), [1, t, d])
        h = h + conv1d(a, p + "attn/c_proj")
        m = gelu(conv1d(norm(h, p + "ln_2"), p + "mlp/c_fc"))
        h = h + conv1d(m, p + "mlp/c_proj")
    h = norm(h, "model/ln_f")
    return tf.einsum("btd,vd->btv", h, v["model/wte"])


def write_openai(weights: dict[str, np.ndarray], folder: Path) -> np.ndarray:
    import tensorflow as tf

    tf1 = tf.compat.v1
    tf1.disable_eager_execution()
    folder.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        tf_vars = {
            name: tf1.get_variable(name, initializer=value) for name, value in weights.items()
        }
        logits_op = tf_forward(tf, tf_vars, np.array(INPUT_IDS, dtype=np.int32))
        saver = tf1.train.Saver(var_list=tf_vars)
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            saver.save(sess, str(folder / "model.ckpt"))
            logits = sess.run(logits_op)
    # OpenAI's file names the checkpoint relatively; TF writes an absolute path.
    (folder / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    )
    (folder / "hparams.json").write_text(json.dumps(HP, indent=2) + "\n")
    return logits


def write_hf(weights: dict[str, np.ndarray], folder: Path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=HP["n_vocab"],
        n_positions=HP["n_ctx"],
        n_embd=HP["n_embd"],
        n_layer=HP["n_layer"],
        n_head=HP["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=HP["n_vocab"] - 1,
        eos_token_id=HP["n_vocab"] - 1,
    )
    model = GPT2LMHeadModel(cfg).eval()
    sd = {}
    for name, value in weights.items():
        hf = name.removeprefix("model/").replace("/", ".")
        hf = hf.replace("h", "h.", 1) if hf.startswith("h") else hf
        hf = hf.removesuffix(".w") + ".weight" if hf.endswith(".w") else hf
        hf = hf.removesuffix(".g") + ".weight" if hf.endswith(".g") else hf
        hf = hf.removesuffix(".b") + ".bias" if hf.endswith(".b") else hf
        hf = hf + ".weight" if hf in ("wte", "wpe") else hf
        sd["transformer." + hf] = torch.from_numpy(value[0] if value.ndim == 3 else value)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m or "attn.bias" in m for m in missing), missing
    model.tie_weights()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    # transformers 5 only writes safetensors; pytorch_model.bin was, and on the hub still
    # is, torch.save of the state dict without the tied lm_head, which is what we write.
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "generation_config.json").unlink(missing_ok=True)
    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        logits = model(ids).logits.numpy()
        greedy = ids
        for _ in range(GREEDY_STEPS):
            nxt = model(greedy).logits[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, nxt], dim=1)
    return logits, greedy[0, ids.shape[1] :].tolist()


def main() -> None:
    # No options; parsed so that --help explains instead of rewriting the fixtures.
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    weights = random_weights()
    tf_logits = write_openai(weights, OUT / "gpt2-tiny-openai")
    hf_logits, greedy = write_hf(weights, OUT / "gpt2-tiny-hf")
    np.save(OUT / "gpt2-tiny-logits-tf.npy", tf_logits.astype(np.float32))
    np.save(OUT / "gpt2-tiny-logits-hf.npy", hf_logits.astype(np.float32))
    (OUT / "gpt2-tiny-reference.json").write_text(
        json.dumps({"input_ids": INPUT_IDS, "greedy_tokens": greedy}, indent=2) + "\n"
    )
    print("max |tf - hf| logits:", float(np.abs(tf_logits - hf_logits).max()))


if __name__ == "__main__":
    main()
