"""Batch-1 greedy generation speed on CPU or GPU: diygpt (KV cache, fp32 and int8, each
also with ``--compile``) vs transformers ``generate``, same weights, same prompt, in one run.

    python bench/generate_speed.py [--new-tokens 200] [--repeats 3] [--checkpoint RUN]

Also prints the int8 path's quality cost: loss and perplexity on the-verdict, fp32 vs int8,
with the same (random gpt2-small, or --checkpoint) weights.
"""

from __future__ import annotations

import argparse
import copy
import time
from unittest import mock

import _common
import torch

from diygpt import static_decode
from diygpt.checkpoints import load_model
from diygpt.config import get_preset
from diygpt.data import GPTDatasetV1, make_loader
from diygpt.generation import generate
from diygpt.losses import calc_loss_loader, perplexity
from diygpt.model import GPTModel
from diygpt.quantize import quantize_int8
from diygpt.tokenizer import get_tokenizer

PROMPT = [15496, 11, 314, 716]  # "Hello, I am": 4 tokens


def verdict_loss(model, cfg, tokenizer, device) -> float:
    ids = tokenizer.encode_ordinary(_common.VERDICT.read_text(encoding="utf-8"))
    length = min(cfg.context_length, 256)
    loader = make_loader(GPTDatasetV1(None, tokenizer, length, length, token_ids=ids), 4,
                         shuffle=False, drop_last=False)
    with torch.no_grad():
        return calc_loss_loader(loader, model, device)


def profile_call(call, new_tokens: int) -> None:
    """One call under the profiler: wall time vs the time the GPU was busy, and where."""
    from torch.profiler import ProfilerActivity, profile

    call()
    _common.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        call()
        _common.sync()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    print(f"\nprofiled --compile call: {wall * 1e3:.1f} ms wall (under the profiler), "
          f"GPU busy {busy * 1e3:.1f} ms, {len(kernels)} kernels/copies, "
          f"{len(kernels) / new_tokens:.0f} per token")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12,
                                    max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", default=None, help="a run folder instead of random weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the --compile rows")
    ap.add_argument("--cuda-ablation", action="store_true",
                    help="on CUDA, also time --compile without each speed-up of static_decode")
    ap.add_argument("--profile", action="store_true",
                    help="on CUDA, profile one --compile call: GPU busy time and top kernels")
    _common.add_common_args(ap)
    args = ap.parse_args()
    _common.apply_common_args(args)
    device = torch.device(args.device)
    n = args.new_tokens

    torch.manual_seed(123)
    if args.checkpoint:
        ours = load_model(args.checkpoint, device=device)
        hf = None
    else:
        cfg = get_preset("gpt2-small")  # ctx 1024, qkv bias, no dropout
        hf = _common.hf_gpt2(cfg).eval()
        ours = GPTModel(cfg).eval()
        _common.copy_hf_gpt2_into(ours, hf)
        ours, hf = ours.to(device), hf.to(device)
    cfg = ours.cfg
    idx = torch.tensor([PROMPT], device=device)

    def run_ours(model, compile=False):
        return lambda: generate(model, idx, n, cfg.context_length, compile=compile)

    def timed_compiled(model, label):
        start = time.perf_counter()
        with torch.no_grad():
            same = torch.equal(run_ours(model, True)(), run_ours(model)())
        first = time.perf_counter() - start
        t = _common.median_seconds(run_ours(model, True), args.warmup, args.repeats)
        rows.append((f"{label} --compile (first call {first:.0f} s; tokens as without: {same})", n / t))

    int8 = quantize_int8(copy.deepcopy(ours)) if device.type == "cpu" else None
    rows: list[tuple[str, float]] = []
    if hf is not None and not args.skip_hf:
        hf_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            hf_out = hf.generate(idx, **hf_kwargs)
            same = torch.equal(hf_out, generate(ours, idx, n, cfg.context_length))
        print(f"same greedy tokens as transformers: {same}")
        t = _common.median_seconds(lambda: hf.generate(idx, **hf_kwargs), args.warmup,
                                   args.repeats)
        rows.append(("transformers generate (fp32, its KV cache)", n / t))
    t = _common.median_seconds(run_ours(ours), args.warmup, args.repeats)
    rows.append(("diygpt generate (fp32, KV cache)", n / t))
    if not args.skip_compile:
        timed_compiled(ours, "diygpt generate")
        if args.cuda_ablation and device.type == "cuda":
            ablations = (("with SDPA's attention kernel", {"PLAIN_ATTENTION": False}),
                         ("with SDPA, without stacked q/k/v",
                          {"PLAIN_ATTENTION": False, "FUSE_QKV": False}),
                         ("as before: SDPA, new cache per call, 3 q/k/v products, eager prompt",
                          {"PLAIN_ATTENTION": False, "FUSE_QKV": False, "POOL_CACHES": False,
                           "STEP_PROMPT": 0}))
            for note, settings in ablations:
                with mock.patch.multiple(static_decode, **settings):
                    timed_compiled(ours, f"diygpt generate, {note},")
    if int8 is not None:
        t = _common.median_seconds(run_ours(int8), args.warmup, args.repeats)
        rows.append(("diygpt generate --quantize int8", n / t))
        if not args.skip_compile:
            timed_compiled(int8, "diygpt generate --quantize int8")
    baseline = rows[0][0]
    _common.print_table(
        f"greedy generation, {'checkpoint ' + args.checkpoint if args.checkpoint else 'gpt2-small shape'}"
        f", {len(PROMPT)}-token prompt, {n} new tokens, batch 1, {device.type}, "
        f"median of {args.repeats} after {args.warmup} warm-up",
        "tok/s", rows, baseline,
    )
    if args.profile and device.type == "cuda" and not args.skip_compile:
        try:
            profile_call(run_ours(ours, True), n)
        except Exception as exc:  # the table above stands whatever the profiler does
            print(f"profile failed: {type(exc).__name__}: {exc}")
    if int8 is not None:
        tokenizer = get_tokenizer()
        fp32_loss = verdict_loss(ours, cfg, tokenizer, device)
        int8_loss = verdict_loss(int8, cfg, tokenizer, device)
        print(f"\nthe-verdict loss fp32 {fp32_loss:.4f} (perplexity {perplexity(fp32_loss):.2f}), "
              f"int8 {int8_loss:.4f} (perplexity {perplexity(int8_loss):.2f}): "
              f"perplexity {100 * (perplexity(int8_loss) / perplexity(fp32_loss) - 1):+.2f}%")


if __name__ == "__main__":
    main()
