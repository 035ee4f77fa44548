"""Crash-safe checkpoints: every file complete or absent, the last K kept, a ``latest`` pointer.

Layout of a run folder (``diygpt train --out RUN``)::

    RUN/ckpt-000009/   model.safetensors, optimizer.pt, rng.safetensors, state.json
    RUN/ckpt-000019/   ...                  (the last ``keep_last`` checkpoints)
    RUN/latest         "ckpt-000019": the newest complete checkpoint
    RUN/model.safetensors, RUN/state.json   the newest weights, so `generate --checkpoint RUN` works
    RUN/.lock          held by the run training there (a second one is refused)

``ckpt-<step>`` holds the state after the step printed as ``Step <step>`` in the log.

Why it survives a kill at any moment: each file is written to a temp file in its own folder,
fsynced, then ``os.replace``d over its name, and the folder is fsynced, so a name always
points at a whole file. A checkpoint folder is assembled under a temp name and renamed into
place only when all its files are durable; the ``latest`` pointer moves after that. A crash
leaves at worst a ``*.tmp-*`` folder, which is ignored and cleaned up on the next save.

Test hook: ``DIYGPT_TEST_KILL_AT_WRITE=N`` makes the process SIGKILL itself inside the N-th
atomic write (1-based), after the temp file is durable and before ``os.replace``, the worst
moment for a crash. The kill test uses it; nothing else reads it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from safetensors import SafetensorError

from diygpt.errors import CheckpointError

CKPT_PREFIX = "ckpt-"
LATEST_FILE = "latest"
KILL_HOOK_ENV = "DIYGPT_TEST_KILL_AT_WRITE"
LOCK_FILE = ".lock"
_writes_done = 0  # atomic writes in this process, for the test hook


def _fsync_dir(folder: Path) -> None:
    # Makes a rename or a new name durable; some filesystems (and Windows) cannot open folders.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_os_error(exc: OSError, path: Path) -> str:
    """One line for a failed write, naming the usual causes plainly."""
    if exc.errno == errno.ENOSPC:
        return f"cannot write {path}: no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: the folder is read-only or not writable ({exc.strerror})"
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and (
            blocker := next((p for p in (Path(path), *Path(path).parents) if p.is_file()), None)):
        # mkdir(parents=True) under a file says EEXIST, an open under one ENOTDIR
        return f"cannot write {path}: {blocker} is a file, not a folder"
    return f"cannot write {path}: {exc.strerror or exc}"


def _describe_writer_error(exc: Exception, tmp: Path, path: Path) -> str:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    try:
        free = shutil.disk_usage(tmp.parent).free
    except OSError:
        free = None
    if "No space left" in first or (free is not None and free < 64 * 2**20):
        return f"cannot write {path}: no space left on device"
    return f"cannot write {path}: {first[:200]}"


def _kill_hook() -> None:
    global _writes_done
    _writes_done += 1
    target = os.environ.get(KILL_HOOK_ENV)
    if target and int(target) == _writes_done:
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask


_NOT_FILES = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))


def special_kind(path: Path) -> str | None:
    """"a named pipe", "a character device"...: what ``path`` (or a link's target) is when
    it exists but is not a regular file or folder, else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return next((name for test, name in _NOT_FILES if test(mode)), None)


def refuse_special_weights(path: Path) -> None:
    """A one-line error where weights are to be read from a pipe or device (``--weights
    <(cat model.pth)``): the readers seek, and a pipe waits for a writer forever."""
    if kind := special_kind(path):
        raise CheckpointError(f"{path} is {kind}, not a weights file or folder; save the "
                              "weights to a file first")


def output_path(path: str | os.PathLike) -> Path:
    """Where a file the user names as ``--out`` is written: a symlink's target, as the
    shell's ``>`` does (replacing the link would cut it); a dangling link's target is made.
    A run's own files are not followed: a run copied with ``cp -rs`` would write into the
    original."""
    path = Path(path)
    if not path.is_symlink():
        return path
    try:
        return path.resolve(strict=True)
    except FileNotFoundError:
        return path.resolve()
    except RuntimeError:  # a loop, before Python 3.13
        raise CheckpointError(f"cannot write {path}: a symlink loop") from None
    except OSError as exc:  # ELOOP from Python 3.13; ENOTDIR for a link under a file
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"cannot write {path}: a symlink loop") from None
        raise CheckpointError(describe_os_error(exc, path)) from None


def own_file(path: Path) -> None:
    """A symlinked file becomes this folder's own copy before it is changed in place
    (appended to, cut): in a run copied with ``cp -rs`` the change would reach the
    original. atomic_write replaces the link itself."""
    if path.is_symlink():
        atomic_write(path, lambda tmp: shutil.copyfile(path, tmp))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to fill a temp file next to ``path``, then move it into place.

    On any failure the temp file is removed, ``path`` keeps its old content, and an OSError
    becomes a one-line CheckpointError (no space left, read-only folder, ...).
    """
    path = Path(path)
    # A file moved over a device would remove it (`--out /dev/null` as root: the system's).
    if kind := special_kind(path):
        raise CheckpointError(f"cannot write {path}: it is {kind}, not a regular file; "
                              "name a file")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # A name left by a crash may be a hard link to a kept checkpoint's file: writing
        # through it would change that file, so it goes first.
        tmp.unlink(missing_ok=True)
        try:
            write(tmp)
        except (RuntimeError, SafetensorError) as exc:
            # torch.save's zip writer and safetensors' report a failed write (a full disk)
            # as their own errors, not OSError.
            raise CheckpointError(_describe_writer_error(exc, tmp, path)) from None
        # A plain file's mode under the umask: safetensors' writer makes its files 0600,
        # which hid a run's weights from the other users of a shared runs/ folder.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _kill_hook()
        os.replace(tmp, path)
        # rename() of two names of one file does nothing and leaves both.
        tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(describe_os_error(exc, path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def json_ready(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON's null): Python writes them as
    ``NaN``, which strict JSON readers (JavaScript's, Go's, serde) refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(json_ready(payload), indent=2) + "\n")


def check_writable(folder: str | os.PathLike) -> None:
    """Fail now, with one line, if the run folder cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(describe_os_error(exc, folder)) from None
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        raise CheckpointError(describe_os_error(exc, folder)) from None
    probe.unlink(missing_ok=True)


def lock_run_folder(folder: str | os.PathLike) -> IO[str] | None:
    """Hold ``folder/.lock`` while the returned file stays open: a second run into the same
    folder (a command typed again in another terminal) is refused instead of mixing its
    checkpoints and metrics with the first's. The lock goes with the process, however it
    ends. None where locks are not available (Windows, some network filesystems)."""
    try:
        import fcntl
    except ImportError:
        return None
    path = Path(folder) / LOCK_FILE
    try:
        if path.is_symlink():  # a `cp -rs` copy's: it would lock the original too
            path.unlink()
        f = open(path, "a+", encoding="utf-8")  # the caller keeps it open: the lock lasts
    except OSError as exc:
        raise CheckpointError(describe_os_error(exc, path)) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        if holder == str(os.getpid()):  # the Python API: a Trainer not yet let go of
            raise CheckpointError(
                f"{folder} is held by another Trainer in this process (one that loaded a "
                "checkpoint there or is training there); let its fit() end, or delete it"
            ) from None
        raise CheckpointError(
            f"{folder} is in use by another run{f' (pid {holder})' if holder else ''}; wait "
            "for it to end, or choose another --out") from None
    except OSError:  # no locks on this filesystem: go on unguarded, as before
        f.close()
        return None
    try:  # the holder's pid, for the message above
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    except OSError as exc:
        f.close()
        raise CheckpointError(describe_os_error(exc, path)) from None
    return f


# -- checkpoint folders ----------------------------------------------------------------------
# torch.compile's and DDP's wrappers prefix every key a state dict of the wrapper holds.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def unwrapped_name(key: str) -> str:
    """``key`` without torch.compile's and DDP's prefixes, nested in either order
    (``DDP(torch.compile(model))`` saves ``module._orig_mod.``)."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def ckpt_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:06d}"


def _step_of(name: str) -> int | None:
    if not name.startswith(CKPT_PREFIX):
        return None
    digits = name[len(CKPT_PREFIX):]
    return int(digits) if digits.isdigit() else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first (temp folders from a crash are not listed)."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(s, p) for p in run.iterdir() if p.is_dir() and (s := _step_of(p.name)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest`` names; if it is missing or broken, the newest complete one."""
    run = Path(run_dir)
    try:
        name = (run / LATEST_FILE).read_text().strip()
    except OSError:
        name = ""
    if _step_of(name) is not None and (run / name / "state.json").is_file():
        return run / name
    found = list_checkpoints(run)
    return found[-1] if found else None


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    write_files: Callable[[Path], None],
    keep_last: int = 2,
) -> Path:
    """Write one checkpoint atomically and prune old ones; return its folder.

    ``write_files(folder)`` writes the checkpoint's files into ``folder`` (a temp folder),
    each with :func:`atomic_write`. The folder is renamed to ``ckpt-<step>`` once complete.
    """
    run = Path(run_dir)
    final = run / ckpt_name(step)
    tmp = run / f"{final.name}.tmp-{os.getpid()}"
    _remove_tree(tmp)
    try:
        tmp.mkdir(parents=True)
        write_files(tmp)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved before a crash: replace it whole
            old = run / f"{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            _remove_tree(old)
        os.replace(tmp, final)
        _fsync_dir(run)
    except OSError as exc:
        _remove_tree(tmp)
        raise CheckpointError(describe_os_error(exc, final)) from None
    except BaseException:
        _remove_tree(tmp)
        raise
    atomic_write_text(run / LATEST_FILE, final.name + "\n")
    prune(run, keep_last, keep=final)
    return final


def prune(run_dir: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, and temp folders of crashed saves."""
    found = list_checkpoints(run_dir)
    for old in found[: max(0, len(found) - keep_last)]:
        if old != keep:
            _remove_tree(old)
    for stale in run_dir.glob(f"{CKPT_PREFIX}*.tmp-*"):
        if stale.is_dir():
            _remove_tree(stale)


def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src``'s bytes at ``dst`` atomically: a hard link (no extra disk) or else a copy."""
    if dst.exists() and os.path.samefile(src, dst):
        return

    def write(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    atomic_write(dst, write)
