"""``diygpt generate``: continue a prompt, streaming tokens as they come."""

from __future__ import annotations

import argparse
import sys

from diygpt.cli import report
from diygpt.cli.options import (
    add_device_flags,
    add_model_source_flags,
    finite_float,
    load_model_from_args,
    seed_int,
)
from diygpt.errors import OutputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="continue a prompt with a trained or pretrained model",
        description="Continue a prompt. Greedy by default (--temperature 0); with a "
        "temperature > 0 each token is drawn at random, optionally from the top-k "
        "tokens or the top-p nucleus. Tokens are printed as they are generated.",
    )
    add_model_source_flags(p)
    p.add_argument("--prompt", default="Every effort moves you",
                   help="start text (default: the book's 'Every effort moves you')")
    p.add_argument("--max-new-tokens", type=int, default=50,
                   help="how many tokens to add (default 50)")
    p.add_argument("--temperature", type=finite_float, default=0.0,
                   help="0 is greedy (default); higher is more random")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=finite_float, default=None,
                   help="sample only among the most likely tokens covering this probability (0-1]")
    p.add_argument("--seed", type=seed_int, default=None, help="random seed for sampling")
    p.add_argument("--eos", action="store_true",
                   help="stop at <|endoftext|> (token 50256)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute the whole window each step instead of using the KV cache "
                   "(the same tokens in fp32; in bf16 they can part at near ties)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights in every linear layer (dynamic int8 on x86): 4x fewer "
                   "bytes read per token (CPU only; see BENCHMARKS.md for speed and perplexity "
                   "cost). On x86 each call's activations share one scale, so the tokens can "
                   "differ with --no-cache")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step with torch.compile (static KV cache): "
                   "slow first call (tens of seconds on CPU, needs a C++ compiler), faster steps after")
    add_device_flags(p)
    p.set_defaults(func=run)


class _StreamPrinter:
    """Prints the decoded text's growth; holds back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out=None) -> None:
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout  # looked up now, not at import
        # Only the ids not printed yet: everything before them ended on a whole character,
        # so they decode alone as they would in the whole text (and a long output does
        # not decode its growing text again at every token).
        self.pending: list[int] = []

    def feed(self, token_id: int) -> None:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return
        report.out(text, self.out)
        self.pending.clear()

    def close(self) -> None:
        report.out(self.tokenizer.decode(self.pending) + "\n", self.out)
        self.pending.clear()


def _sample_only_decodable_ids(model, n_vocab: int) -> int | None:
    """A head with more rows than the tokenizer has ids (a vocabulary padded to 50304 and
    saved so) is cut to the ids the tokenizer decodes; returns the rows it had, else None."""
    from torch import nn

    from diygpt.speed import first_rows

    head = getattr(model, "out_head", None)
    if type(head) is not nn.Linear or head.out_features <= n_vocab:
        return None
    model.out_head = first_rows(head, n_vocab)
    return head.out_features


def _tolerant_stdout() -> None:
    """Characters the terminal's or file's encoding lacks print as '?' rather than stopping
    the run with a UnicodeEncodeError (Windows' cp1252 when output is redirected)."""
    encoding = (getattr(sys.stdout, "encoding", None) or "utf-8").lower().replace("-", "")
    if not encoding.startswith("utf") and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")


def run(args: argparse.Namespace) -> int:
    import torch

    from diygpt.device import select_device
    from diygpt.errors import GenerationError
    from diygpt.generation import check_prompt, check_sampling_args, stream_generate
    from diygpt.tokenizer import EOT_ID, get_tokenizer, text_to_token_ids

    check_sampling_args(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if not args.prompt:
        raise GenerationError("the prompt is empty: pass --prompt TEXT")
    # Bytes the locale could not decode (a Latin-1 file's `--prompt "$(cat f)"` under UTF-8)
    # reach argv as lone surrogates, which a strict stdout cannot echo; the tokenizer reads
    # them as U+FFFD, and so does the echo now. Characters read rightly stay as they are.
    try:
        raw = args.prompt.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate of another kind (Windows' argv)
        raw = args.prompt.encode("utf-8", "replace")
    args.prompt = raw.decode("utf-8", "replace")
    if args.compile and not args.use_cache:
        raise GenerationError("--compile works on the KV cache: drop --no-cache")
    unused = [f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p),
                             ("--seed", args.seed)) if v is not None]
    if args.temperature == 0 and unused:
        verb = "changes" if len(unused) == 1 else "change"
        print(f"diygpt: note: {', '.join(unused)} {verb} nothing at --temperature 0 (greedy); "
              "give a temperature > 0 to sample", file=sys.stderr)
    if args.quantize and args.dtype not in (None, "fp32"):  # its products run in fp32
        raise GenerationError(f"--quantize {args.quantize} computes in fp32: drop --dtype {args.dtype}")
    device = select_device(args.device)
    if args.quantize and device.type != "cpu":
        raise GenerationError(f"--quantize {args.quantize} is for the CPU, not {device.type}: add "
                              "--device cpu (on a GPU, --dtype bf16 --compile is the fast path)")
    model = load_model_from_args(args, device)
    tokenizer = get_tokenizer(args.tokenizer_dir)
    if rows := _sample_only_decodable_ids(model, tokenizer.n_vocab):
        print(f"diygpt: note: the model has {rows} output rows; the tokenizer decodes "
              f"{tokenizer.n_vocab} ids, so only those are sampled", file=sys.stderr)
    if args.eos and EOT_ID >= model.tok_emb.num_embeddings:
        print(f"diygpt: note: --eos stops at token {EOT_ID}, which this model's vocabulary of "
              f"{model.tok_emb.num_embeddings} does not have: it changes nothing",
              file=sys.stderr)
    if args.quantize == "int8":
        from diygpt.quantize import quantize_int8

        # fp32 activations for fbgemm's kernel, even from a checkpoint stored in bf16/fp16
        quantize_int8(model.float())
    idx = text_to_token_ids(args.prompt, tokenizer)
    check_prompt(model, idx)
    if idx.shape[1] > model.context_length:
        print(
            f"diygpt: the prompt has {idx.shape[1]} tokens; the model sees its last "
            f"{model.context_length}", file=sys.stderr,
        )
    if args.seed is not None:
        torch.manual_seed(args.seed)
    _tolerant_stdout()
    printer = _StreamPrinter(tokenizer)
    report.out(args.prompt)
    try:
        for next_id in stream_generate(
            model, idx, args.max_new_tokens, model.context_length, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, eos_id=EOT_ID if args.eos else None,
            use_cache=args.use_cache, compile=args.compile,
        ):
            printer.feed(int(next_id[0, 0]))
    except (Exception, KeyboardInterrupt) as exc:
        if not isinstance(exc, (BrokenPipeError, OutputError)):  # the error gets a line of its own
            report.out("\n")
        raise
    printer.close()
    return 0
