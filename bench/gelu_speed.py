"""The book's GELU on the CPU: diygpt.fast_gelu's kernel against torch's ops, one run.

python bench/gelu_speed.py [--shape 2,256,3072] [--steps 20]

On a (B, T, 4C) tensor (book-124m's feed-forward width by default): the forward pass, the
parts ``diygpt.lean`` remakes in backward (output, 0.5 x, tanh's output), and x's gradient
with tanh's output remade, each with torch's ops (diygpt.lean's code without the kernel)
and with the kernel. Median of --steps calls, in millions of elements a second, with the
ratio to torch's ops; then whether the kernel's results equal torch's.
"""

from __future__ import annotations

import argparse

import _common
import torch

from diygpt import fast_gelu as fg
from diygpt.model import GELU


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2,256,3072")
    ap.add_argument("--steps", type=int, default=20)
    _common.add_common_args(ap)
    args = ap.parse_args()
    _common.apply_common_args(args)
    kernel = fg.load_kernel()
    if kernel is None:
        raise SystemExit(f"fast GELU unavailable: {fg.unavailable_reason()}")
    torch.manual_seed(0)
    x = torch.randn(*map(int, args.shape.split(","))) * 2
    grad = torch.randn_like(x)
    million = x.numel() / 1e6
    work = {
        "forward": (lambda: GELU.forward(None, x), lambda: kernel.forward(x, parts=False)),
        "parts remade in backward": (lambda: fg.torch_parts(x),
                                     lambda: kernel.forward(x, parts=True)),
        "x's gradient, tanh remade": (lambda: fg.torch_backward(grad, x, *fg.torch_halves(x)),
                                      lambda: kernel.backward(grad, x, None)),
    }
    for name, (ops, fused) in work.items():
        rows = [(label, million / _common.median_seconds(fn, warmup=2, repeats=args.steps))
                for label, fn in (("torch's ops (diygpt.lean)", ops), ("diygpt.fast_gelu", fused))]
        _common.print_table(f"GELU on {args.shape}: {name}", "M elements/s", rows, rows[0][0])
        got, expected = fused(), ops()
        got, expected = (r if isinstance(r, tuple) else (r,) for r in (got, expected))
        print(f"\nequal to torch's: {all(map(torch.equal, got, expected))}")


if __name__ == "__main__":
    main()
