"""Shared by the bench scripts: timing (median of whole runs after warm-up), tables, peers."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # book_reference: the book's chapter-4 code, the peer
ASSETS = Path(os.environ.get("DIYGPT_ASSETS", ROOT.parent / "shared" / "assets"))
os.environ.setdefault("DIYGPT_TOKENIZER_DIR", str(ASSETS / "gpt2"))
VERDICT = ASSETS / "the-verdict.txt"


def seed_train_args(attn: str, max_steps: int, out: str) -> list[str]:
    """``diygpt train`` arguments of the seed's run (book-124m on the-verdict, batch 2, AdamW,
    unshuffled; scripts/seed_run.sh), stopped after ``max_steps``, quiet, into ``out``."""
    return [
        "train", "--data", str(VERDICT), "--preset", "book-124m", "--epochs", "10",
        "--batch-size", "2", "--lr", "0.0004", "--weight-decay", "0.1", "--no-shuffle",
        "--no-drop-last", "--seed", "123", "--attn", attn, "--sample-prompt", "",
        "--max-steps", str(max_steps), "--no-progress", "--out", out,
    ]


def add_common_args(ap) -> None:
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice); 1 is steadier on a busy machine")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with this process's CPU seconds, not wall seconds: on a shared "
                    "machine wall time measures the other users too (use with --threads 1)")


def add_matmul_precision_arg(ap) -> None:
    """For the benches that time fp32 products in this process, on both sides alike."""
    ap.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default=None,
                    help="torch.set_float32_matmul_precision for diygpt and its peer (on a "
                    "CPU with AMX, 'medium' runs fp32 products in bf16 through oneDNN)")


def apply_common_args(args) -> None:
    global CLOCK, CLOCK_NAME
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "matmul_precision", None):
        torch.set_float32_matmul_precision(args.matmul_precision)
    if args.cpu_time:
        CLOCK, CLOCK_NAME = time.process_time, "process CPU time"


CLOCK: Callable[[], float] = time.perf_counter
CLOCK_NAME = "wall time"


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = CLOCK()
        fn()
        sync()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def window_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Mean time of ``repeats`` calls queued back to back: one wait for the GPU, at the end."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = CLOCK()
    for _ in range(repeats):
        fn()
    sync()
    return (CLOCK() - t0) / repeats


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {gpu}, load average {load:.1f}, "
            f"timed by {CLOCK_NAME}")


def print_table(title: str, unit: str, rows: list[tuple[str, float]], baseline: str) -> None:
    """One markdown table: each row's rate and its ratio to the ``baseline`` row."""
    base = dict(rows)[baseline]
    print(f"\n### {title}\n\n{machine()}\n")
    print(f"| implementation | {unit} | vs {baseline} |\n| --- | ---: | ---: |")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")
    sys.stdout.flush()


def verdict_batch(batch_size: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (B, T) from the-verdict's tokens, repeated as needed."""
    from diygpt.tokenizer import get_tokenizer

    ids = get_tokenizer().encode_ordinary(VERDICT.read_text(encoding="utf-8"))
    need = batch_size * seq_len + 1
    data = torch.tensor((ids * (need // len(ids) + 1))[:need], device=device)
    return data[:-1].view(batch_size, seq_len), data[1:].view(batch_size, seq_len)


def copy_hf_gpt2_into(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    """Copy a transformers GPT2LMHeadModel's weights into a diygpt GPTModel of the same shape.

    HF's Conv1D stores weights as (in, out), nn.Linear as (out, in); c_attn packs q, k, v.
    """
    sd = hf.state_dict()
    with torch.no_grad():
        ours.tok_emb.weight.copy_(sd["transformer.wte.weight"])
        ours.pos_emb.weight.copy_(sd["transformer.wpe.weight"])
        ours.out_head.weight.copy_(sd["lm_head.weight"])
        ours.final_norm.scale.copy_(sd["transformer.ln_f.weight"])
        ours.final_norm.shift.copy_(sd["transformer.ln_f.bias"])
        for i, block in enumerate(ours.trf_blocks):
            p = f"transformer.h.{i}."
            q, k, v = sd[p + "attn.c_attn.weight"].chunk(3, dim=1)
            qb, kb, vb = sd[p + "attn.c_attn.bias"].chunk(3)
            for lin, w, b in ((block.att.W_query, q, qb), (block.att.W_key, k, kb),
                              (block.att.W_value, v, vb)):
                lin.weight.copy_(w.T)
                if lin.bias is not None:
                    lin.bias.copy_(b)
            pairs = ((block.att.out_proj, "attn.c_proj"), (block.ff.layers[0], "mlp.c_fc"),
                     (block.ff.layers[2], "mlp.c_proj"))
            for lin, name in pairs:
                lin.weight.copy_(sd[p + name + ".weight"].T)
                lin.bias.copy_(sd[p + name + ".bias"])
            for norm, name in ((block.norm1, "ln_1"), (block.norm2, "ln_2")):
                norm.scale.copy_(sd[p + name + ".weight"])
                norm.shift.copy_(sd[p + name + ".bias"])


def hf_gpt2(cfg, dropout: float | None = None):
    """A transformers GPT2LMHeadModel of the diygpt config's shape (random weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    rate = cfg.drop_rate if dropout is None else dropout
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=rate, embd_pdrop=rate,
        attn_pdrop=rate, activation_function="gelu_new",
    )
    return GPT2LMHeadModel(hf_cfg)
