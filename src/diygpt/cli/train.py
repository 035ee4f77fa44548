"""``diygpt train``: pretrain a GPT on text files, as in the book's chapter 5."""

from __future__ import annotations

import argparse
import os
import shlex
import traceback
from pathlib import Path

from diygpt.cli import report
from diygpt.cli.options import (
    add_device_flags,
    build_config,
    path_arg,
    positive_int,
    ranged,
    seed_int,
    stride_warning,
)
from diygpt.cli.speed_flags import add_speed_flags, prepare_model, setup_training
from diygpt.cli.train_flags import check_flag_combinations
from diygpt.config import ATTENTION_IMPLS, PRESETS, GPTConfig
from diygpt.errors import DiygptError

EXAMPLE = """example (the seed's run, section 2.1):
  diygpt train --data the-verdict.txt --preset book-124m --epochs 10 --batch-size 2 \\
    --lr 0.0004 --weight-decay 0.1 --eval-freq 5 --eval-iter 5 --no-shuffle --no-drop-last \\
    --seed 123 --attn eager --sample-prompt "Every effort moves you" --out runs/seed
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="pretrain a GPT on text files",
        description="Pretrain a GPT on text: split into train/validation, slide windows, "
        "train with AdamW, print losses every --eval-freq steps and a greedy sample after "
        "each epoch. The run folder gets model.safetensors, optimizer.pt, state.json, "
        "metrics.jsonl, loss.png and its final checkpoint ckpt-<step>/ (with a latest "
        "pointer), which the top-level weights and optimizer state link to.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", action="extend", default=None, metavar="PATH",
                   type=path_arg,
                   help="text file(s) or folder(s) of .txt files (UTF-8), or .bin token file(s) "
                   "from `diygpt prepare`; required unless --resume")
    d.add_argument("--train-ratio", type=ranged(float, 0, 1, low_open=True), default=0.9,
                   help="fraction of characters (of tokens for .bin files) used for training, the "
                   "rest validates (default 0.9)")
    d.add_argument("--stride", type=positive_int, default=None,
                   help="step between windows in tokens (default: the context length)")
    d.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="keep training windows in order (shuffled by default)")
    d.add_argument("--drop-last", dest="drop_last", action="store_true", default=True,
                   help="drop a last incomplete training batch (the default, as the book's loader)")
    d.add_argument("--no-drop-last", dest="drop_last", action="store_false",
                   help="keep a last incomplete training batch")

    m = p.add_argument_group("model")
    m.add_argument("--preset", default="book-124m", choices=list(PRESETS),
                   help="model shape (default book-124m, the seed's GPT_CONFIG_124M)")
    m.add_argument("--context-length", type=positive_int, default=None,
                   help="tokens per window and model context (default: the preset's)")
    m.add_argument("--drop-rate", type=ranged(float, 0, 1, high_open=True), default=None,
                   help="dropout rate (default: the preset's)")
    m.add_argument("--attn", choices=ATTENTION_IMPLS, default=None,
                   help="attention: sdpa (fused, default) or eager (the book's math, bit-exact)")
    m.add_argument("--init-from", metavar="SOURCE", default=None, type=path_arg,
                   help="start from these weights, not random ones: gpt2-small|medium|large|xl "
                   "(after `diygpt download`), OpenAI's or Hugging Face's files, a run folder, "
                   "or a book model.pth (shaped by its tensors, or by a typed --preset). The "
                   "model keeps their shape (--context-length or a typed --preset's context "
                   "may shorten it); dropout and attention are this run's (--drop-rate, --attn, "
                   "default the preset's)")
    m.add_argument("--init-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="with --init-from, AdamW's moments and step counts from the source "
                   "where it holds them (a run folder, a book model_and_optimizer.pth), with "
                   "this run's --lr and --weight-decay (default on; --no-init-optimizer: "
                   "AdamW afresh)")
    m.add_argument("--emb-dim", type=positive_int, default=None, help="override the embedding size")
    m.add_argument("--n-layers", type=positive_int, default=None, help="override the layer count")
    m.add_argument("--n-heads", type=positive_int, default=None, help="override the head count")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=ranged(int, 0), default=10, help="passes over the training windows (default 10)")
    o.add_argument("--batch-size", type=positive_int, default=2,
                   help="windows per optimizer step: the global batch (default 2)")
    o.add_argument("--lr", type=ranged(float, 0, 1e30, low_open=True), default=4e-4, help="AdamW learning rate (default 0.0004)")
    o.add_argument("--weight-decay", type=ranged(float, 0), default=0.1, help="AdamW weight decay (default 0.1)")
    o.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps")
    o.add_argument("--warmup-steps", type=ranged(int, 0), default=0, help="linear LR warmup steps (default 0)")
    o.add_argument("--cosine", action="store_true",
                   help="decay the LR along a cosine to --min-lr over the run")
    o.add_argument("--min-lr", type=ranged(float, 0, 1e30), default=0.0, help="final LR with --cosine (default 0)")
    o.add_argument("--grad-clip", type=ranged(float, 0, low_open=True), default=None,
                   help="clip the global gradient norm to this value")
    o.add_argument("--grad-accum", type=positive_int, default=1,
                   help="split each batch into this many micro-batches: less memory, the same "
                   "gradient up to rounding (with dropout, masks are drawn per micro-batch, "
                   "so they differ)")
    o.add_argument("--seed", type=seed_int, default=123, help="random seed (default 123, the book's)")

    e = p.add_argument_group("evaluation and output")
    e.add_argument("--eval-freq", type=positive_int, default=5,
                   help="evaluate every N steps (default 5)")
    e.add_argument("--eval-iter", type=positive_int, default=5,
                   help="batches per evaluation, of train and of validation (default 5)")
    e.add_argument("--sample-prompt", default="Every effort moves you",
                   help='start of the greedy sample printed after each epoch ("" for none)')
    e.add_argument("--out", default="runs/train", type=path_arg, help="run folder (default runs/train)")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar on stderr, shown only when stderr is a terminal "
                   "(--no-progress: never)")
    c = p.add_argument_group("checkpoints and resume")
    c.add_argument("--save-every", type=positive_int, default=None, metavar="N",
                   help="save a checkpoint RUN/ckpt-<step> every N steps, atomically (every "
                   "run also saves one at its end and on Ctrl-C/SIGTERM)")
    c.add_argument("--keep-last", type=positive_int, default=2, metavar="K",
                   help="keep the newest K checkpoints (default 2)")
    c.add_argument("--resume", metavar="RUN", default=None, type=path_arg,
                   help="continue RUN from its last complete checkpoint, exactly, with its "
                   "saved settings; the device, run length, checkpoint and progress flags, "
                   "--data (a moved copy of the same text), --tokenizer-dir, --fsdp, "
                   "--compile-mode and the memory and exact speed-up flags may change "
                   "(docs/checkpoints.md)")
    c.add_argument("--nan-policy", choices=["stop", "skip"], default="stop",
                   help="on a non-finite loss or gradient norm: stop with an error (default) "
                   "or skip that step")
    mem = p.add_argument_group("memory and exact speed-ups (every setting gives the same numbers)")
    mem.add_argument("--fast-draws", action=argparse.BooleanOptionalAction, default=None,
                     help="draw dropout's masks on the CPU with diygpt's vectorized copy of "
                     "torch's generator (built once with the C compiler): the same masks, "
                     "about 120 ms less per book-124m step. Default: on for the CPU; without "
                     "a C compiler, torch's own draws")
    mem.add_argument("--fast-adamw", action=argparse.BooleanOptionalAction, default=None,
                     help="update AdamW's CPU float32 parameters with diygpt's one-pass copy of "
                     "torch's AdamW arithmetic (built once with the C compiler): the same "
                     "weights, about 195 ms less per book-124m step. Default: on for the "
                     "CPU; without a C compiler, or with --fused-adamw, torch's own")
    mem.add_argument("--fast-gelu", action=argparse.BooleanOptionalAction, default=None,
                     help="run GELU and its backward on the CPU as one pass each with diygpt's "
                     "copy of torch's arithmetic for the book's formula (built once with the "
                     "C compiler): the same values. Default: on for the CPU without "
                     "--compile (it serves the uncompiled CPU model only); without a C "
                     "compiler, torch's own ops")
    mem.add_argument("--optim-in-backward", action=argparse.BooleanOptionalAction, default=None,
                     help="step AdamW on each parameter inside backward, as soon as its gradient "
                     "is complete, so the gradients (650 MB for book-124m) never all live at "
                     "once, and on the CPU the output head's and token embedding's are made a "
                     "slice of rows at a time; bit-identical to stepping after backward. "
                     "Default: on for the CPU; "
                     "ignored with --grad-clip, --grad-accum, fp16, --compile, torchrun or "
                     "--nan-policy skip")
    mem.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=False,
                     help="recompute each block's activations during backward instead of keeping "
                     "them, step AdamW inside backward on any device, and trim glibc's heap "
                     "after the forward pass and before the biggest updates: same numbers, "
                     "about a quarter slower")
    mem.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                     help="with --no-recompute, keep LayerNorm's and GELU's outputs and attention's dropped weights "
                     "for backward instead of recomputing them there from what is kept anyway "
                     "(CPU): about 180-200 MB more for book-124m, at the same speed")
    mem.add_argument("--malloc-tuning", action=argparse.BooleanOptionalAction, default=True,
                     help="with --no-malloc-tuning, leave glibc's thresholds alone and trim only "
                     "where --trim-heap or --low-memory asks; by default AdamW's moments get "
                     "mappings of their own, apart from the activations, and on the CPU "
                     "either the heap's free pages are handed back during a step (--trim-heap, "
                     "the default uncompiled, or --low-memory) or, without trimming, blocks of "
                     "up to 1 GiB are reused from the heap instead of mapped afresh each step "
                     "(1.10-1.19x a compiled book-124m step, 370 MiB more at the seed run's peak)")
    mem.add_argument("--trim-heap", action=argparse.BooleanOptionalAction, default=None,
                     help="hand glibc's free heap pages back after each training forward pass, "
                     "before backward peaks: 60-115 MB less for book-124m, 2-5%% slower. "
                     "Default: on for the CPU without --compile, which keeps the seed's run "
                     "under 3000 MiB (--low-memory does it too)")
    add_speed_flags(p)
    add_device_flags(p)
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False,
                   help="under torchrun, shard weights, gradients and optimizer state across "
                   "ranks (FSDP2) instead of replicating them (DDP); see docs/distributed.md. "
                   "A resumed FSDP run stays sharded under torchrun unless --no-fsdp; one "
                   "process resumes it unsharded")
    # `--resume` needs the parser to tell which flags the user typed.
    p.set_defaults(func=run, parser=p)


def _quiet(line: str) -> None:
    """Ranks other than 0 stay silent; rank 0 speaks for the run."""


def run(args: argparse.Namespace) -> int:
    from diygpt import distributed

    env, device = distributed.init_distributed(args.device)  # torchrun's env, if any
    try:
        rc = _train(args, env, device)
    except BaseException as exc:
        _free_frames(exc)
        if env.world_size > 1 and distributed.every_rank_knows(exc):
            # torchrun stops the other ranks as soon as one exits, so each says its line
            # before any leaves: rank 0, whose error it is, first.
            said = isinstance(exc, DiygptError)
            if said and env.is_main:
                report.error(str(exc))
            distributed.barrier()
            if said and not env.is_main:
                report.error(str(exc))
            distributed.shutdown()
            if said:
                raise report.Reported() from None
            raise
        distributed.shutdown(wait=False)
        if env.world_size > 1 and distributed.lost_peer(exc):
            # Another rank stopped on an error of its own and said so; not a traceback here.
            raise distributed.RankStopped() from None
        raise
    distributed.shutdown()
    return rc


def _resume_command(env, out) -> str:
    """The command that resumes the run as it was started: one process would resume an
    FSDP run unsharded."""
    resume = f"diygpt train --resume {shlex.quote(str(out))}"
    if not env.launched:
        return resume
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    if per_node >= env.world_size:
        return f"torchrun --nproc_per_node {per_node} -m {resume}"
    return f"the same torchrun command on each node, with -m {resume} as its program"


def _free_frames(exc: BaseException) -> None:
    """Clear the locals of the frames a failed run left in ``exc`` and the exceptions it
    chains to, so its model (and DDP's reducer) goes before the process group does: see
    distributed.shutdown."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _train(args: argparse.Namespace, env, device) -> int:
    import torch

    from diygpt import fast_adamw, fast_gelu
    from diygpt.cli.resume_args import NOT_SETTINGS, merge_resume_args
    from diygpt.data import check_token_ids, load_training_data, loaders_from_tokens
    from diygpt.distributed import wrap_model
    from diygpt.errors import ConfigError, DataError
    from diygpt.fast_draws import fast_draws, unavailable_reason
    from diygpt.lean import lean_activations
    from diygpt.memory import recompute_blocks, tune_malloc
    from diygpt.model import GPTModel
    from diygpt.resume import (
        check_fresh_run_folder,
        find_resume_checkpoint,
        read_training_checkpoint,
    )
    from diygpt.signals import Interrupted
    from diygpt.tokenizer import get_tokenizer
    from diygpt.training import TrainConfig, Trainer

    ckpt = None
    if args.resume:
        ckpt = read_training_checkpoint(find_resume_checkpoint(args.resume))
        args = merge_resume_args(args, ckpt.state.get("train_args"), args.parser,
                                 launched=env.launched)
        if missing := [p for p in args.data or [] if not Path(p).exists()]:
            raise DataError(f"the run's data {missing[0]} does not exist; if it moved, resume "
                            "with --data NEW_PATH (the text must be the same)")
    elif not args.data:
        raise ConfigError("--data is required (or --resume RUN to continue a run)")
    else:
        check_fresh_run_folder(args.out)
    check_flag_combinations(args, resuming=ckpt is not None)
    start, moments = None, None
    if args.init_from and ckpt is None:
        from diygpt.cli.init_from import start_from_args

        start, moments = start_from_args(args)
        cfg = start.cfg
    elif args.init_from:  # resuming a warm-started run: its shape is the checkpoint's
        cfg = GPTConfig.from_dict(ckpt.state["config"])
    else:
        cfg = build_config(args)
    train_cfg = TrainConfig(
        num_epochs=args.epochs, eval_freq=args.eval_freq, eval_iter=args.eval_iter,
        start_context=args.sample_prompt or None, max_steps=args.max_steps,
        warmup_steps=args.warmup_steps, cosine=args.cosine, min_lr=args.min_lr,
        grad_clip=args.grad_clip, grad_accum=args.grad_accum, out_dir=args.out,
        progress=args.progress, save_every=args.save_every, keep_last=args.keep_last,
        nan_policy=args.nan_policy,
        optim_in_backward=True if args.low_memory and args.optim_in_backward is None
        else args.optim_in_backward,
    )
    warn = report.say if env.is_main else _quiet
    tokenizer = get_tokenizer(args.tokenizer_dir)
    data = load_training_data(args.data, tokenizer, args.train_ratio)
    digest = data.digest
    if ckpt is not None and ckpt.state.get("data_sha256", digest) != digest:
        raise DataError(
            f"the training text changed since {ckpt.folder} was saved; an exact resume needs "
            "the same --data"
        )

    if warning := stride_warning(args.stride, cfg.context_length, "trained on"):
        warn(warning)
    if args.grad_accum > args.batch_size:
        warn(f"diygpt: note: --grad-accum {args.grad_accum} is more than the {args.batch_size} "
             f"windows of a batch; each step runs micro-batches of one window")
    for ids, split in ((data.train_ids, "the training split"), (data.val_ids, "the val split")):
        check_token_ids(ids, cfg.vocab_size, split)
    torch.manual_seed(args.seed)
    train_loader, val_loader = loaders_from_tokens(
        data.train_ids, data.val_ids, args.batch_size, cfg.context_length, args.stride,
        shuffle=args.shuffle, drop_last=args.drop_last, warn=warn,
    )
    # The book seeds again right before building the model, so its weights do not depend on
    # what the loaders consumed.
    torch.manual_seed(args.seed)
    model = (GPTModel(cfg) if start is None else start).to(device)
    n_params = model.num_parameters()
    if start is not None:
        from diygpt.cli.init_from import start_note

        warn(start_note(args.init_from, cfg, moments))
    if device.type == "cpu" and not args.compile:
        lean_activations(model, recompute=args.recompute)  # less kept for backward; same numbers
    if args.low_memory:
        recompute_blocks(model)
    prepare_model(args, model, device)  # --pad-vocab, --tf32, fused q/k/v: before any wrapper
    # DDP or FSDP under torchrun, before the optimizer (FSDP swaps in sharded parameters).
    model, parallel = wrap_model(model, env, device, fsdp=args.fsdp)
    fast = setup_training(args, model, device)  # optimizer, --dtype, --compile, tok/s meter
    if isinstance(fast.optimizer, fast_adamw.FastAdamW) and fast_adamw.load_kernel() is None:
        warn(f"diygpt: torch's AdamW update, not the fast one: {fast_adamw.unavailable_reason()}")
    trim = args.trim_heap
    if trim is None:  # where the exact eager step's memory work applies
        trim = args.malloc_tuning and device.type == "cpu" and not args.compile
    trim = trim or args.low_memory  # typed trims hold under --no-malloc-tuning too
    if args.malloc_tuning or trim:
        tune_malloc(fast.model, fast.optimizer, trim_after_forward=trim,
                    trim_before_big_steps=args.low_memory,
                    recycle=device.type == "cpu" and not trim, thresholds=args.malloc_tuning)
    ranks = f" x {env.world_size} ranks ({'FSDP' if args.fsdp else 'DDP'})" if parallel else ""
    warn(
        f"diygpt: {n_params / 1e6:.1f}M parameters on {device}{ranks}; "
        f"{len(train_loader)} train / {len(val_loader)} val batches per epoch"
    )
    train_args = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    train_args["data"] = [str(Path(d).resolve()) for d in args.data]  # resumable from anywhere
    if args.tokenizer_dir is not None:
        train_args["tokenizer_dir"] = str(Path(args.tokenizer_dir).resolve())
    run_state = {"train_args": train_args, "data_sha256": digest}
    trainer = Trainer(
        fast.model, fast.optimizer, train_loader, val_loader, device, train_cfg, tokenizer,
        run_state=run_state, parallel=parallel, precision=fast.precision, meter=fast.meter,
        loss_fn=fast.loss_fn,
    )
    if moments is not None:
        trainer.start_optimizer_from(moments)
        moments = None  # AdamW holds them now (a padded head's as copies)
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)
        warn(f"diygpt: resuming from {ckpt.folder} (after step {ckpt.state['global_step']})")
        done = trainer.history.global_step + 1
        if done >= trainer.total_steps():
            by_steps = args.max_steps is not None and args.max_steps <= done
            limit = f"--max-steps {args.max_steps}" if by_steps else f"--epochs {args.epochs}"
            warn(f"diygpt: note: the run has taken {done} steps, all that {limit} allows: "
                 f"nothing to train; raise {limit.split()[0]} to go on")
        elif args.cosine and ckpt.state.get("total_steps", trainer.total_steps()) != (
                total := trainer.total_steps()):
            # The curve is a function of the run's length: another length, another curve.
            warn(f"diygpt: note: --cosine's curve now spans {total} steps, not the "
                 f"{ckpt.state['total_steps']} it spanned when {ckpt.folder.name} was saved: "
                 "from here the learning rate follows the new curve")
    draws = device.type == "cpu" if args.fast_draws is None else args.fast_draws
    # GELU's kernel serves diygpt.lean's GELU, which only the uncompiled CPU model has.
    gelu = device.type == "cpu" and not args.compile if args.fast_gelu is None else args.fast_gelu
    try:
        with fast_draws(draws) as on, fast_gelu.fast_gelu(gelu) as gelu_on:
            if draws and not on:
                warn(f"diygpt: torch's dropout draws, not the fast ones: {unavailable_reason()}")
            if gelu and not gelu_on:
                warn(f"diygpt: torch's GELU ops, not the fast ones: "
                     f"{fast_gelu.unavailable_reason()}")
            history = trainer.fit()
    except Interrupted as stop:
        where = f"checkpoint saved to {stop.checkpoint}; " if stop.checkpoint else ""
        warn(f"diygpt: {stop}; {where}resume with: {_resume_command(env, args.out)}")
        return stop.exit_code
    steps = history.global_step + 1
    written = [n for n in ("model.safetensors", "loss.png", "metrics.jsonl")  # none at --epochs 0
               if (Path(args.out) / n).is_file()]
    # Weights that have diverged make every later step non-finite: the count says so.
    skipped = f" ({trainer.skipped_steps} skipped as non-finite)" if trainer.skipped_steps else ""
    warn(
        f"diygpt: {steps} step{'' if steps == 1 else 's'}{skipped}, {history.tokens_seen} tokens "
        f"seen; saved to {args.out}/ ({', '.join(written)})"
    )
    return 0
