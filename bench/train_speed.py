"""Training step speed: diygpt vs the book's reference code vs transformers, one run.

    python bench/train_speed.py [--preset book-124m] [--batch-size 2] [--steps 5] [--compile]

A step is the book's: zero_grad, forward, cross entropy, backward, AdamW step, on the
same batch of the-verdict's tokens. Peers run under the same --dtype autocast. Median of whole steps after warm-up; tokens per second
is batch * context / step time. On CUDA add --dtype bf16 --compile --fused-adamw --pad-vocab
for the fast GPU path (with MFU).

On a CPU, diygpt's rows run as the CLI runs its step there: dropout drawn by
diygpt.fast_draws, AdamW as diygpt.fast_adamw (unless --fused-adamw), and with --compile glibc's allocator tuned by
memory.tune_malloc(recycle=True) (--default-malloc leaves it). That setting lasts for the
process, so the peers are timed first, with glibc as it comes; --peer-recycled-row times
transformers again at the end under it.
"""

from __future__ import annotations

import argparse
import contextlib

import _common
import torch

import book_reference
from diygpt import fused_ce
from diygpt.chunked_head import chunk_head
from diygpt.config import get_preset
from diygpt.fast_draws import fast_draws, load_kernel, unavailable_reason
from diygpt.losses import token_cross_entropy
from diygpt.memory import tune_malloc
from diygpt.model import GPTModel
from diygpt.precision import Precision, enable_tf32
from diygpt.speed import (
    COMPILE_MODES,
    compile_loss,
    compile_model,
    flops_per_token,
    fuse_qkv,
    make_adamw,
    pad_vocab,
    peak_flops,
    training_loss,
)


def step_fn(model, optimizer, x, y, precision: Precision, hf: bool = False,
            loss_fn=token_cross_entropy, attention=None, read_loss: bool = True,
            graphs: bool = False):
    """One training step; ``attention`` (optional) makes a context that picks SDPA's kernel.

    ``read_loss`` False leaves the loss on the device, so steps queue back to back with no
    wait for the GPU between them; ``graphs`` marks each step's start for CUDA-graph replay.
    """
    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad()
        with precision.autocast(), attention() if attention else contextlib.nullcontext():
            logits = model(x).logits if hf else model(x)
            loss = loss_fn(logits, y)
        precision.backward(loss)
        precision.step(optimizer)
        return loss.item() if read_loss else loss
    return step


def trainer_step_fn(model, optimizer, x, y, precision: Precision, loss_fn, device):
    """The CLI's step: Trainer.train_step (gradient norm, the non-finite guard) and
    finish_step (the loss read for the progress bar)."""
    from diygpt.training import TrainConfig, Trainer

    trainer = Trainer(model, optimizer, None, None, device, TrainConfig(progress=False),
                      precision=precision, loss_fn=loss_fn)
    return lambda: trainer.finish_step(trainer.train_step(x, y))


def profile_step(step, rows: int = 12) -> None:
    """The CUDA kernels of one more step, by their total time (what a step spends where)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
    print("\n" + prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows,
                                             max_name_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="book-124m")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fused-adamw", action="store_true")
    ap.add_argument("--pad-vocab", action="store_true")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--peers", default="book,hf", help="comma list of book, hf (or none)")
    ap.add_argument("--variants", default="sdpa,eager", help="diygpt attention kernels to time")
    ap.add_argument("--eager-loss-row", action="store_true",
                    help="with --compile, also time the first variant with its loss left eager")
    ap.add_argument("--previous-row", action="store_true",
                    help="with --compile, also time the first variant as --compile was before: "
                    "the loss in its log-softmax form (and on CUDA three q/k/v products)")
    ap.add_argument("--triton-loss-row", action="store_true",
                    help="with --compile on CUDA, also time the first variant with the loss as "
                    "diygpt.fused_ce's Triton kernels (speed.training_loss(fused=True))")
    ap.add_argument("--sliced-row", action="store_true",
                    help="with --compile on CUDA, also time the first variant with the Triton "
                    "loss on the padded head's sliced logits")
    ap.add_argument("--tuning-row", action="store_true",
                    help="with --compile, also time the first variant with inductor's "
                    "coordinate-descent tuning of its generated kernels (slow to compile)")
    ap.add_argument("--autotune-row", action="store_true",
                    help="with --compile, also time the first variant compiled as "
                    "--autotune-mode says and with the CLI's loss (the Triton one where it "
                    "runs; minutes to compile)")
    ap.add_argument("--autotune-mode", choices=[m for m in COMPILE_MODES if m != "default"],
                    default="max-autotune", help="the --autotune-row's compile_model mode "
                    "(as diygpt train --compile-mode): max-autotune-aten times cuBLAS's own "
                    "variants only, no Triton templates to compile")
    ap.add_argument("--cudagraph-row", action="store_true",
                    help="with --compile on CUDA, also time the Triton-loss row compiled with "
                    "mode='reduce-overhead' (forward and backward replayed as CUDA graphs)")
    ap.add_argument("--trainer-row", action="store_true",
                    help="also time the first variant through Trainer.train_step with the "
                    "CLI's loss: the CLI's step (gradient norm, the non-finite guard)")
    ap.add_argument("--back-to-back", action="store_true",
                    help="also time each row with its steps queued back to back, the loss "
                    "not read between them (one wait for the GPU per window of steps)")
    ap.add_argument("--plain-head-row", action="store_true",
                    help="with --compile on a CPU in fp32, also time the first variant with "
                    "its output head as one product per step (the CLI slices it: "
                    "diygpt.chunked_head)")
    ap.add_argument("--torch-draws-row", action="store_true",
                    help="on a CPU, also time the first variant with dropout drawn by torch's "
                    "bernoulli_ (diygpt's rows, as the CLI, use diygpt.fast_draws there)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="on a CPU with --compile, leave glibc's allocator as it is for "
                    "diygpt's rows too (by default they run, as the CLI's compiled step, with "
                    "memory.tune_malloc(recycle=True), which lasts for the rest of the process: "
                    "so the peers are timed first)")
    ap.add_argument("--peer-recycled-row", action="store_true",
                    help="on a CPU with --compile, time transformers again at the end, under "
                    "the allocator setting diygpt's rows ran with")
    ap.add_argument("--cudnn-row", action="store_true",
                    help="also time the first variant with SDPA forced onto cuDNN attention")
    ap.add_argument("--profile", action="store_true",
                    help="print the CUDA kernels of one step of the first variant (and of "
                    "the Triton-loss row)")
    _common.add_matmul_precision_arg(ap)
    _common.add_common_args(ap)
    args = ap.parse_args()
    _common.apply_common_args(args)
    device = torch.device(args.device)
    if args.tf32:
        enable_tf32()
    cfg = get_preset(args.preset)
    t = cfg.context_length
    x, y = _common.verdict_batch(args.batch_size, t, device)
    tokens = x.numel()
    fast = Precision(device, args.dtype)
    speedups = [name for name in ("compile", "fused_adamw", "pad_vocab", "tf32") if getattr(args, name)]
    if args.matmul_precision:
        speedups.append(f"matmul precision {args.matmul_precision}")
    label = f"{args.dtype}{' + ' + ' + '.join(speedups) if speedups else ''}"

    rows: list[tuple[str, float]] = []
    queued: list[tuple[str, float]] = []  # --back-to-back

    def time_it(name, model, optimizer, precision, hf=False, trainer=False, **how):
        torch.manual_seed(0)
        if trainer:
            step = trainer_step_fn(model, optimizer, x, y, precision, how["loss_fn"], device)
        else:
            step = step_fn(model, optimizer, x, y, precision, hf, **how)
        rows.append((name, tokens / _common.median_seconds(step, args.warmup, args.steps)))
        print(f"{name}: {rows[-1][1]:.0f} tok/s", flush=True)  # kept if a later row is killed
        if args.back_to_back and not trainer:
            unread = step_fn(model, optimizer, x, y, precision, hf, read_loss=False, **how)
            queued.append((name, tokens / _common.window_seconds(unread, 2, args.steps)))
            print(f"{name}, back to back: {queued[-1][1]:.0f} tok/s", flush=True)
        return step

    peers = [p for p in args.peers.split(",") if p and p != "none"]
    if "hf" in peers:
        torch.manual_seed(123)
        hf = _common.hf_gpt2(cfg).to(device).train()
        time_it(f"transformers GPT2LMHeadModel ({args.dtype})", hf,
                torch.optim.AdamW(hf.parameters(), lr=4e-4, weight_decay=0.1), fast, hf=True)
        del hf
    if "book" in peers:
        torch.manual_seed(123)
        book = book_reference.BookGPTModel(cfg.to_dict()).to(device).train()
        time_it(f"book reference GPTModel ({args.dtype})", book,
                torch.optim.AdamW(book.parameters(), lr=4e-4, weight_decay=0.1), fast)
        del book
    # (attention, note, step_fn's options, fuse q/k/v, inductor tuning, loss); as
    # the CLI does, --compile on CUDA fuses q/k/v. Loss: None is the CLI's; "triton" the
    # Triton kernels over the padded head's whole output, "sliced" over its sliced logits.
    fuse = args.compile and device.type == "cuda"
    first = args.variants.split(",")[0]
    variants = [(v, "", {}, fuse, "", None) for v in args.variants.split(",") if v]
    if args.eager_loss_row and args.compile:
        variants.append((first, ", loss eager", {}, fuse, "", token_cross_entropy))
    if args.previous_row and args.compile:
        what = "3 q/k/v products, log-softmax loss" if fuse else "log-softmax loss"
        variants.append((first, f", as before: {what}", {}, False, "",
                         torch.compile(token_cross_entropy)))
    if args.compile and fused_ce.available(device):
        if args.triton_loss_row:
            variants.append((first, ", Triton loss", {}, fuse, "", "triton"))
        if args.sliced_row:
            variants.append((first, ", Triton loss on the sliced logits", {}, fuse, "",
                             "sliced"))
        if args.cudagraph_row:
            variants.append((first, ", Triton loss, CUDA graphs", {"graphs": True}, fuse,
                             "reduce-overhead", "triton"))
    if args.trainer_row:  # the CLI's loss too: the Triton one where fused_ce.available
        variants.append((first, ", the CLI's step (Trainer.train_step)", {"trainer": True},
                         fuse, "", "cli"))
    # As the CLI does, --compile on a CPU in fp32 slices the head's products.
    chunk = args.compile and device.type == "cpu" and args.dtype == "fp32"
    if args.plain_head_row and chunk:
        variants.append((first, ", head in one product", {"plain_head": True}, fuse, "", None))
    # As the CLI does, on a CPU dropout's masks come from diygpt.fast_draws (the peers keep
    # torch's kernel: the context is open only around diygpt's rows).
    draws = device.type == "cpu" and load_kernel() is not None
    if device.type == "cpu" and not draws:
        print(f"fast draws unavailable, diygpt's rows draw with torch: {unavailable_reason()}")
    recycle = device.type == "cpu" and args.compile and not args.default_malloc
    if args.torch_draws_row and draws:
        variants.append((first, ", torch's dropout draws", {"torch_draws": True}, fuse, "", None))
    if args.cudnn_row:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        variants.append((first, ", cuDNN attention",
                         {"attention": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)}, fuse,
                         "", None))
    if args.tuning_row and args.compile:
        variants.append((first, ", coordinate-descent tuning", {}, fuse, "coordinate", None))
    if args.autotune_row and args.compile:  # with the CLI's loss, so its match is that row
        cli_loss = "triton" if fused_ce.available(device) else None
        note = f", {args.autotune_mode}{', Triton loss' if cli_loss else ''}"
        variants.append((first, note, {}, fuse, "max-autotune", cli_loss))
    for i, (attn, note, how, fused, tuning, loss) in enumerate(variants):
        if args.compile:
            import torch._inductor.config as inductor_config

            torch._dynamo.reset()  # e.g. the SDPA kernel is picked when compiling, unguarded
            inductor_config.coordinate_descent_tuning = tuning == "coordinate"
        torch.manual_seed(123)
        model = GPTModel(cfg.with_updates(attn_impl=attn)).to(device).train()
        if args.pad_vocab:
            pad_vocab(model)
        if fused:
            fuse_qkv(model)
        if chunk and not how.get("plain_head"):
            chunk_head(model)
        fast_rng = draws and not how.get("torch_draws")
        how = {k: v for k, v in how.items() if k not in ("plain_head", "torch_draws")}
        opt = make_adamw(model.parameters(), 4e-4, 0.1, fused=args.fused_adamw,
                         fast=device.type == "cpu")  # as the CLI: diygpt.fast_adamw there
        if recycle:
            tune_malloc(model, opt, recycle=True)
        if tuning == "max-autotune":  # as --compile-mode max-autotune does it
            wrapped = compile_model(model, args.autotune_mode)
        elif tuning == "reduce-overhead":
            wrapped = torch.compile(model, mode="reduce-overhead")
        else:
            wrapped = compile_model(model) if args.compile else model
        if loss is None:
            loss_fn = compile_loss() if args.compile else token_cross_entropy
        elif loss == "cli":  # as speed_flags.setup_training picks it
            loss_fn = (training_loss(model, device, fused=True) if args.compile
                       else token_cross_entropy)
        elif loss in ("triton", "sliced"):
            loss_fn = training_loss(model, device, fused=True)
            if loss == "sliced":
                model.out_head.keep_padding = False
        else:
            loss_fn = loss
        how = {"loss_fn": loss_fn, **how}
        name = f"diygpt --attn {attn} ({label}{' + fused q/k/v' if fused else ''}{note})"
        try:
            with fast_draws(fast_rng):
                step = time_it(name, wrapped, opt, fast, **how)
        except Exception as exc:  # a kernel this GPU or torch lacks: report, go on
            print(f"{name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        if args.profile and (i == 0 or note == ", Triton loss") and device.type == "cuda":
            try:
                profile_step(step)
            except Exception as exc:  # the timings stand whatever the profiler does
                print(f"profile failed: {type(exc).__name__}: {exc}")
        del model, opt, wrapped, step
    if args.peer_recycled_row and recycle and "hf" in peers:
        torch.manual_seed(123)
        hf = _common.hf_gpt2(cfg).to(device).train()
        time_it(f"transformers GPT2LMHeadModel ({args.dtype}), diygpt's allocator setting", hf,
                torch.optim.AdamW(hf.parameters(), lr=4e-4, weight_decay=0.1), fast, hf=True)
        del hf
    _common.print_table(
        f"training step, {args.preset} (ctx {t}, batch {args.batch_size}, AdamW), "
        f"{device.type}, median of {args.steps} steps after {args.warmup} warm-up",
        "tok/s", rows, rows[0][0],
    )
    if queued:
        _common.print_table(
            f"the same, steps queued back to back (the loss not read between them): "
            f"{args.steps} steps after 2 warm-up, one wait at the end", "tok/s", queued,
            queued[0][0],
        )
    peak = peak_flops(device)
    if peak is not None:
        best = max(rate for name, rate in rows if name.startswith("diygpt"))
        print(f"\nMFU of the fastest diygpt row: {best * flops_per_token(cfg) / peak:.1%} "
              f"of {peak / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
