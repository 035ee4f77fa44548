"""Small C kernels that copy a torch CPU op's exact arithmetic, built on first use.

torch's CPU kernels for dropout's draws, AdamW's update and the book's GELU are exact but
slow: the draws took 150 ms of a book-124m step, AdamW 400 and GELU about 230 of an eager
step of 2.4 s (BENCHMARKS.md, sixteenth and seventeenth passes). ``mt_bernoulli.c``, ``adamw_step.c`` and ``gelu_tanh.c``
compute the same values faster; :mod:`diygpt.fast_draws`, :mod:`diygpt.fast_adamw` and
:mod:`diygpt.fast_gelu` compare each with torch before using it. This module only builds
them: with the system's C compiler (``$CC``, which may carry a wrapper or flags, else
``cc``), once per source (with the headers beside it, ``native_fp.h``), compiler and kind
of CPU, into ``$DIYGPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/diygpt``, else
``~/.cache/diygpt``.

The first of these flag sets that compiles is kept: ``-march=native -fopenmp``, then without
one or both. With gcc, ``-fopenmp`` links ``libgomp``, which resolves to the copy torch has
already loaded, so ``adamw_step.c`` and ``gelu_tanh.c`` run on torch's own threads. clang's links its
``libomp`` instead, a second runtime with threads of its own (exact still; its speed not
measured here). A build cached without OpenMP stays single-threaded; delete the cache folder
to build again.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

K = TypeVar("K")

# No product and sum may fuse into one rounding unless the source asks (fmaf): the kernels
# must round where torch's do. -march=native and OpenMP first; some compilers lack them.
_COMMON = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
_TRIES = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])


def cache_dir() -> Path:
    if os.environ.get("DIYGPT_CACHE_DIR"):
        return Path(os.environ["DIYGPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diygpt"


def _cpu_tag() -> str:
    """The instruction sets -march=native builds for, so a shared cache keeps one per kind."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {flags}"


def build(source: Path) -> Path:
    """The shared library of ``source`` in the cache, compiled if it is not there yet."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    command = shlex.split(cc)  # CC may carry a wrapper or flags: "ccache gcc"
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # what it may include
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, cc.encode(),
                                     _cpu_tag().encode(), shlex.join(_COMMON).encode()]))
    key = key.hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    if target.parent.exists() and not target.parent.is_dir():
        raise RuntimeError(f"the build cache {target.parent} is a file, not a folder "
                           "(DIYGPT_CACHE_DIR names the folder)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # A folder of its own: ranks, or threads, may build at once; the last rename wins whole.
    # The linker creates the file there, so it gets the umask's mode (a file made first by
    # mkstemp would stay 0600 plus x: unreadable to the other users of a shared cache).
    workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp = workdir / target.name
    error = ""
    try:
        for flags in _TRIES:
            done = subprocess.run([*command, *_COMMON, *flags, "-o", str(tmp), str(source), "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            error = (done.stderr.strip().splitlines() or ["failed"])[-1]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError(f"{cc} could not build {source.name}: {error}")


class CheckedKernel(Generic[K]):
    """One process's copy of a C kernel: built, bound and compared with torch on first use.

    ``binds()`` lists the ways to bind the library, tried in order; ``agrees(kernel)``
    compares one with torch. After :meth:`load`, ``kernel`` is the first that agrees, or
    None with ``reason`` saying why (``mismatch`` when none agrees, else why the library
    could not be built or loaded). Both are kept: the check runs once a process.
    """

    def __init__(self, source: Path, binds: Callable[[], Iterable[Callable[[ctypes.CDLL], K]]],
                 agrees: Callable[[K], bool], mismatch: str) -> None:
        self.source = source
        self._binds, self._agrees, self._mismatch = binds, agrees, mismatch
        self._lock = threading.Lock()
        self.kernel: K | None = None
        self.reason: str | None = None

    def load(self) -> K | None:
        with self._lock:
            if self.kernel is None and self.reason is None:
                self.kernel, self.reason = self._check()
            return self.kernel

    def _check(self) -> tuple[K | None, str | None]:
        try:
            library = ctypes.CDLL(str(build(self.source)))
            for bind in self._binds():
                kernel = bind(library)
                if self._agrees(kernel):
                    return kernel, None
            return None, self._mismatch
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            return None, str(exc)


# ATen's vml.h calls MKL's VML functions with VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
VML_MODE = 0x2 | 0x140000 | 0x100


def vml_first(name: str, bind: Callable[[ctypes.CDLL, int | None], K]
              ) -> Callable[[], list[Callable[[ctypes.CDLL], K]]]:
    """A :class:`CheckedKernel`'s ``binds``: with torch's own VML function ``name`` first (what
    torch's x86 builds compute with), then with None, the kernel's C fallback."""
    def binds() -> list[Callable[[ctypes.CDLL], K]]:
        return [lambda library, f=f: bind(library, f)
                for f in dict.fromkeys([torch_vml(name), None])]

    return binds


def torch_vml(name: str) -> int | None:
    """The address of MKL's VML function ``name`` (e.g. vmsSqrt) in torch's own library.

    torch's CPU sqrt and tanh are MKL's on x86, and not always the correctly rounded
    results, so a kernel that must equal torch calls the same function. None where torch
    has no MKL (its own vectorized code is then what a kernel must match).
    """
    import torch  # only here: the build functions above do not need it

    for lib in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            return ctypes.cast(getattr(ctypes.CDLL(str(lib)), name), ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None
