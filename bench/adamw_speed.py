"""AdamW's CPU update: diygpt.fast_adamw against torch's AdamW, default and fused, one run.

python bench/adamw_speed.py [--preset book-124m] [--steps 5]

The model's parameters with fixed random gradients (sizes 1e-7 to 10), stepped two ways:
all at once (``optimizer.step()`` after backward, as the book's loop does) and one
parameter at a time (as ``diygpt train`` steps them inside backward on the CPU). Each
optimizer has its own copy of the weights; a warm-up step makes the moments. Median of
--steps steps, in millions of parameters a second, with the ratio to torch's default AdamW
(the single-tensor code the book's numbers come from). The script then checks that
FastAdamW's weights and moments equal that AdamW's to the bit, and that the fused one's do
not.
"""

from __future__ import annotations

import argparse

import _common
import torch

from diygpt.config import get_preset
from diygpt.fast_adamw import FastAdamW, load_kernel, unavailable_reason
from diygpt.model import GPTModel

OPTIMIZERS = {
    "torch AdamW (the book's)": lambda ps: torch.optim.AdamW(ps, lr=4e-4, weight_decay=0.1),
    "torch AdamW fused=True": lambda ps: torch.optim.AdamW(ps, lr=4e-4, weight_decay=0.1,
                                                           fused=True),
    "diygpt FastAdamW": lambda ps: FastAdamW(ps, lr=4e-4, weight_decay=0.1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="book-124m")
    ap.add_argument("--steps", type=int, default=5)
    _common.add_common_args(ap)
    args = ap.parse_args()
    _common.apply_common_args(args)
    if load_kernel() is None:
        raise SystemExit(f"fast AdamW unavailable: {unavailable_reason()}")
    torch.manual_seed(0)
    start = [p.detach() for p in GPTModel(get_preset(args.preset)).parameters()]
    grads = [torch.randn_like(p) * 10.0 ** torch.randint(-7, 2, p.shape) for p in start]
    numel = sum(p.numel() for p in start) / 1e6
    for how in ("all at once", "one parameter at a time"):
        rows, runs = [], {}
        for name, make in OPTIMIZERS.items():
            params = [p.clone().requires_grad_() for p in start]
            opt = make(params)

            def step(params=params, opt=opt, how=how) -> None:
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                    if how != "all at once":
                        opt.step()
                        p.grad = None
                if how == "all at once":
                    opt.step()

            seconds = _common.median_seconds(step, warmup=1, repeats=args.steps)
            rows.append((name, numel / seconds))
            runs[name] = (params, opt)
        _common.print_table(f"AdamW update of {args.preset} ({numel:.1f}M parameters), {how}",
                            "M params/s", rows, next(iter(OPTIMIZERS)))
        book, fused, fast = (runs[name] for name in OPTIMIZERS)
        print(f"\nFastAdamW equals the book's AdamW: {_same(fast, book)}; "
              f"torch's fused AdamW does: {_same(fused, book)}")


def _same(a, b) -> bool:
    (pa, oa), (pb, ob) = a, b
    return all(torch.equal(x, y) and all(torch.equal(oa.state[x][k], ob.state[y][k])
                                         for k in ("exp_avg", "exp_avg_sq"))
               for x, y in zip(pa, pb, strict=True))


if __name__ == "__main__":
    main()
