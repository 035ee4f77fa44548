"""diygpt.fast_draws: the same dropout masks and generator state as torch's own kernel."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from diygpt import fast_draws as fd
from tests_helpers import forget_kernel

pytestmark = pytest.mark.skipif(fd.load_kernel() is None,
                                reason=f"kernel unavailable: {fd.unavailable_reason()}")


def _draw(make, p: float, seed: int, skip: int, fast: bool):
    """(tensor, generator state after) for one bernoulli_ on a generator advanced by ``skip``."""
    gen = torch.Generator().manual_seed(seed)
    torch.empty(skip).bernoulli_(0.5, generator=gen)
    t = make()
    with fd.fast_draws(fast) as on:
        assert on == fast
        t.bernoulli_(p, generator=gen)
    return t, gen.get_state()


@pytest.mark.parametrize("n", [0, 1, 2, 311, 312, 313, 624, 625, 4096, 4097, 100_003])
@pytest.mark.parametrize("p", [0.9, 0.5, 0.1, 0.0, 1.0, 1 / 3])
def test_values_and_state_equal_torchs(n: int, p: float) -> None:
    for seed, skip in ((123, 0), (5, 1), (99, 311)):  # a fresh engine, and part-way through one
        want, want_state = _draw(lambda: torch.empty(n), p, seed, skip, fast=False)
        got, got_state = _draw(lambda: torch.empty(n), p, seed, skip, fast=True)
        assert torch.equal(got, want)
        assert torch.equal(got_state, want_state)


@pytest.mark.parametrize("make", [
    lambda: torch.empty(6, 7).t(),  # dense, not contiguous
    lambda: torch.empty(5, 8)[:, ::3],  # strided
    lambda: torch.empty(3, 4, 5).permute(2, 0, 1)[1:],
    lambda: torch.empty(()),
    lambda: torch.empty(4, 9, dtype=torch.bfloat16),
    lambda: torch.empty(40, dtype=torch.float64),
    lambda: torch.empty(40, dtype=torch.float16),
    lambda: torch.empty(8, 5, dtype=torch.int16),
    lambda: torch.empty(40, dtype=torch.int32)[::2],
    lambda: torch.empty(3, 40, dtype=torch.int64).t(),
    lambda: torch.empty(33, dtype=torch.bool),
    lambda: torch.empty(5, 7, dtype=torch.bool).t(),
    lambda: torch.empty(4100, dtype=torch.uint8),
    lambda: torch.empty(20, dtype=torch.int8),
    lambda: torch.empty(2, 3, 8, 8).to(memory_format=torch.channels_last),
], ids=["transposed", "strided", "permuted-slice", "scalar", "bf16", "f64", "f16", "int16",
        "int32-strided", "int64", "bool", "bool-transposed", "uint8", "int8", "channels-last"])
def test_layouts_and_dtypes_equal_torchs(make) -> None:
    want, want_state = _draw(make, 0.7, 3, 17, fast=False)
    got, got_state = _draw(make, 0.7, 3, 17, fast=True)
    assert got.dtype == want.dtype and got.stride() == want.stride()
    assert torch.equal(got, want)
    assert torch.equal(got_state, want_state)


def test_default_generator_and_dropout_callers() -> None:
    """F.dropout and attention's dropout inside SDPA draw from the default generator too."""
    x = torch.randn(2, 4, 16, 8)

    def run() -> list[torch.Tensor]:
        torch.manual_seed(11)
        out = [F.dropout(x, 0.1, True),
               F.scaled_dot_product_attention(x, x, x, dropout_p=0.1, is_causal=True)]
        return [*out, torch.rand(3)]

    want = run()
    with fd.fast_draws():
        got = run()
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_errors_match_torchs() -> None:
    with fd.fast_draws():
        with pytest.raises(RuntimeError, match=r"p to be in \[0, 1\]"):
            torch.empty(3).bernoulli_(1.5)
        with pytest.raises(RuntimeError, match="single memory location"):
            torch.empty(1).expand(4).bernoulli_(0.5)
        with pytest.raises(RuntimeError, match="not implemented"):
            torch.empty(3, dtype=torch.complex64).bernoulli_(0.5)


def test_torchs_kernel_returns_when_the_outermost_block_closes(monkeypatch) -> None:
    calls = []
    kernel = fd.load_kernel()
    monkeypatch.setattr(fd._loaded, "kernel", lambda *args: calls.append(args[2]) or kernel(*args))
    with fd.fast_draws():
        with fd.fast_draws():
            assert fd._users == 2
        assert fd._users == 1 and fd._library is not None
        torch.empty(5).bernoulli_(0.5)
    assert fd._users == 0 and fd._library is None
    torch.empty(6).bernoulli_(0.5)
    with fd.fast_draws(enabled=False) as on:
        assert not on and fd._library is None
        torch.empty(7).bernoulli_(0.5)
    assert calls == [5]


def test_unavailable_kernel_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    forget_kernel(monkeypatch, fd._loaded, no_compiler_in=tmp_path)
    assert fd.load_kernel() is None
    assert "no-such-cc" in (fd.unavailable_reason() or "")
    with fd.fast_draws() as on:
        assert not on


def test_a_kernel_that_disagrees_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(state_ptr, out_ptr, n, threshold, one_byte) -> None:
        pass  # draws nothing: the values stay whatever empty() held, the state unmoved

    assert fd._agrees_with_torch(fd.load_kernel())
    forget_kernel(monkeypatch, fd._loaded)
    monkeypatch.setattr(fd, "_bind", lambda library: wrong)
    assert fd.load_kernel() is None
    assert "draws differently" in fd.unavailable_reason()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs cc")
def test_cc_may_carry_flags_and_a_failed_build_leaves_no_file(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DIYGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"{shutil.which('cc')} -std=c99")
    old_mask = os.umask(0o022)
    try:
        built = fd.native.build(fd.SOURCE)
    finally:
        os.umask(old_mask)
    assert built.parent == tmp_path and built.exists()
    assert built.stat().st_mode & 0o777 == 0o755  # a shared cache serves every user
    monkeypatch.setenv("CC", f"{shutil.which('cc')} -no-such-flag")
    with pytest.raises(RuntimeError, match="could not build"):
        fd.native.build(fd.SOURCE)
    assert [p.name for p in tmp_path.iterdir()] == [built.name]


def test_a_file_as_the_build_cache_is_said_plainly(monkeypatch, tmp_path) -> None:
    # it was "[Errno 17] File exists: 'cache'" in the warning that the fast draws are off
    cache = tmp_path / "cache"
    cache.write_text("")
    monkeypatch.setenv("DIYGPT_CACHE_DIR", str(cache))
    with pytest.raises(RuntimeError, match=f"the build cache {cache} is a file, not a folder"):
        fd.native.build(fd.SOURCE)


def test_cli_draws_fast_by_default_on_the_cpu_with_the_same_result(data, tmp_path, capsys,
                                                                   monkeypatch) -> None:
    from cli_helpers import train_tiny

    calls = []
    kernel = fd.load_kernel()
    monkeypatch.setattr(fd._loaded, "kernel", lambda *args: calls.append(args[2]) or kernel(*args))
    runs = []
    for extra in ([], ["--no-fast-draws"], ["--attn", "eager"], ["--attn", "eager", "--no-fast-draws"]):
        out = tmp_path / f"run{len(runs)}"
        before = len(calls)
        rc, stdout, err = train_tiny(capsys, data, out, "--max-steps", "2", "--drop-rate", "0.1",
                                     *extra)
        assert rc == 0, err
        assert (len(calls) > before) == ("--no-fast-draws" not in extra)
        runs.append(((out / "model.safetensors").read_bytes(), stdout))
    assert runs[0] == runs[1] and runs[2] == runs[3]
