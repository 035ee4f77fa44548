"""How fast can an fp32 training step go here? Every matrix product of one step, timed alone.

    python bench/train_roofline.py [--preset book-124m] [--batch-size 2] [--repeats 5]

A training step of GPT-2 is mostly matrix products: per linear layer one for the forward,
one for the input's gradient and one for the weight's gradient, plus attention's batched
products. This times each of them alone with torch's BLAS, in the layouts autograd uses,
sums them into a lower bound for the step, and times transformers' whole step in the same
run: any implementation built on these BLAS calls is at most (their step / that bound)
times faster than transformers.
"""

from __future__ import annotations

import argparse

import _common
import torch
import torch.nn.functional as F

from diygpt.config import get_preset


def linear_products(m: int, k: int, n: int) -> list[tuple[str, object]]:
    """(M, K) x weight (N, K) as F.linear does, then the two gradient products."""
    x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    return [
        (f"fwd {m}x{k} @ ({n}x{k}).T", lambda: F.linear(x, w)),
        (f"grad input {m}x{n} @ {n}x{k}", lambda: g @ w),
        (f"grad weight ({m}x{n}).T @ {m}x{k}", lambda: g.t() @ x),
    ]


def attention_products(b: int, h: int, t: int, d: int) -> list[tuple[str, object]]:
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))  # dO has q's shape
    s = torch.randn(b, h, t, t)  # scores, weights and their gradients share this shape
    return [
        ("attn S = Q @ K.T", lambda: q @ k.transpose(-1, -2)),
        ("attn O = P @ V", lambda: s @ v),
        ("attn dP = dO @ V.T", lambda: q @ v.transpose(-1, -2)),
        ("attn dV = P.T @ dO", lambda: s.transpose(-1, -2) @ q),
        ("attn dQ = dS @ K", lambda: s @ k),
        ("attn dK = dS.T @ Q", lambda: s.transpose(-1, -2) @ q),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="book-124m")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true")
    _common.add_matmul_precision_arg(ap)
    _common.add_common_args(ap)
    args = ap.parse_args()
    _common.apply_common_args(args)
    cfg = get_preset(args.preset)
    m, c, t = args.batch_size * cfg.context_length, cfg.emb_dim, cfg.context_length

    per_layer = (linear_products(m, c, c) * 4  # W_query, W_key, W_value, out_proj
                 + linear_products(m, c, 4 * c) + linear_products(m, 4 * c, c)
                 + attention_products(args.batch_size, cfg.n_heads, t, cfg.head_dim))
    head = linear_products(m, c, cfg.vocab_size)
    layer_s = sum(_common.median_seconds(fn, 1, args.repeats) for _, fn in per_layer)
    head_s = sum(_common.median_seconds(fn, 1, args.repeats) for _, fn in head)
    bound = cfg.n_layers * layer_s + head_s
    print(f"matrix products of one {args.preset} step (batch {args.batch_size}, {m} tokens), "
          f"fp32 (matmul precision {torch.get_float32_matmul_precision()}), "
          f"{torch.get_num_threads()} threads, each timed alone:")
    print(f"  per block {1000 * layer_s:.1f} ms x {cfg.n_layers} + output head {1000 * head_s:.1f} ms"
          f" = {1000 * bound:.0f} ms -> at most {m / bound:.1f} tok/s")
    if args.skip_hf:
        return
    from train_speed import step_fn

    from diygpt.precision import Precision

    torch.manual_seed(123)
    hf = _common.hf_gpt2(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch_size, t + 1))
    opt = torch.optim.AdamW(hf.parameters(), lr=4e-4, weight_decay=0.1)
    step = step_fn(hf, opt, ids[:, :-1], ids[:, 1:], Precision(torch.device("cpu"), "fp32"), hf=True)
    hf_s = _common.median_seconds(step, 2, args.repeats)
    print(f"transformers GPT2LMHeadModel, whole step: {1000 * hf_s:.0f} ms ({m / hf_s:.1f} tok/s)")
    print(f"=> products alone are {hf_s / bound:.2f}x faster than transformers' step: the most "
          f"any implementation on these BLAS calls can gain over it")


if __name__ == "__main__":
    main()
