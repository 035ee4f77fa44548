"""GPU training-step experiments of issue #5 (one process, rows against transformers).

    python bench/train_experiments.py [--preset gpt2-small] [--rows hf,base,joint,...]

The ways of compiling a training step that were tried for the 550k tok/s target, adopted
or not (results: bench/results/2026-11-27-h200-train-experiments.txt, BENCHMARKS.md).
Every row: bf16 autocast, fused AdamW, TF32, vocab padded to 50304, torch.compile.
Rows:
  hf        transformers GPT2LMHeadModel, the peer
  base      model and loss compiled separately, log-softmax loss (--compile before)
  joint     model and loss traced as one graph (not adopted: no gain)
  fce       joint, with losses.logsumexp_cross_entropy
  sfce      model and loss compiled separately, logsumexp_cross_entropy (adopted)
  qkv       fce, with speed.fuse_qkv (adopted, compiled separately)
  cg        qkv, in CUDA graphs, mode="reduce-overhead" (not adopted: +0.9%)
  cdt       qkv, with inductor's coordinate-descent tuning (not adopted: +0.6%)
"""

from __future__ import annotations

import argparse
import time

import _common
import torch
import torch._inductor.config as inductor_config
from train_speed import profile_step

from diygpt.config import get_preset
from diygpt.losses import logsumexp_cross_entropy, token_cross_entropy
from diygpt.model import GPTModel
from diygpt.precision import Precision, enable_tf32
from diygpt.speed import flops_per_token, fuse_qkv, make_adamw, pad_vocab, peak_flops


class ModelLoss(torch.nn.Module):
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x, y):
        return self.loss_fn(self.model(x), y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", default="hf,base,joint,fce,sfce,qkv,cg,cdt")
    ap.add_argument("--profile", default="base,qkv", help="rows whose one step is profiled")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    enable_tf32()
    cfg = get_preset(args.preset)
    t = cfg.context_length
    x, y = _common.verdict_batch(args.batch_size, t, device)
    prec = Precision(device, "bf16")
    rows: list[tuple[str, float]] = []

    for row in args.rows.split(","):
        torch._dynamo.reset()
        inductor_config.coordinate_descent_tuning = row == "cdt"
        torch.manual_seed(123)
        if row == "hf":
            model = _common.hf_gpt2(cfg).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, fused=True)

            def fwd(m=model):
                return token_cross_entropy(m(x).logits, y)
        else:
            model = pad_vocab(GPTModel(cfg).to(device).train())
            if row in ("qkv", "cdt", "cg"):
                fuse_qkv(model)
            opt = make_adamw(model.parameters(), 4e-4, 0.1, fused=True)
            if row in ("base", "sfce"):
                cm = torch.compile(model)
                cl = torch.compile(token_cross_entropy if row == "base" else logsumexp_cross_entropy)

                def fwd(cm=cm, cl=cl):
                    return cl(cm(x), y)
            else:
                loss = token_cross_entropy if row == "joint" else logsumexp_cross_entropy
                mode = "reduce-overhead" if row == "cg" else None
                joint = torch.compile(ModelLoss(model, loss), mode=mode)

                def fwd(joint=joint, row=row):
                    if row == "cg":
                        torch.compiler.cudagraph_mark_step_begin()
                    return joint(x, y)

        def step(fwd=fwd, opt=opt):
            opt.zero_grad()
            with prec.autocast():
                loss = fwd()
            loss.backward()
            opt.step()
            return loss.item()

        try:
            t0 = time.perf_counter()
            first = step()
            compile_s = time.perf_counter() - t0
            rate = x.numel() / _common.median_seconds(step, args.warmup, args.steps)
        except Exception as exc:
            print(f"{row}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            continue
        name = f"{row} (first step {compile_s:.0f} s, loss {first:.4f})"
        print(f"{name}: {rate:.0f} tok/s", flush=True)
        rows.append((name, rate))
        if row in args.profile.split(",") and device.type == "cuda":
            profile_step(step, rows=30)
        del model, opt, fwd, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _common.print_table(f"training step experiments, {args.preset} ctx {t} batch {args.batch_size}",
                        "tok/s", rows, rows[0][0])
    peak = peak_flops(device)
    if peak is not None:
        for name, rate in rows:
            print(f"MFU {name.split()[0]}: {rate * flops_per_token(cfg) / peak:.1%}")


if __name__ == "__main__":
    main()
