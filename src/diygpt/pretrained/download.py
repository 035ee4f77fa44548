"""Download GPT-2's weights from their public sources, resumably and checked.

Each file is streamed to ``FILE.part``, resumed from there with an HTTP Range request if
a previous attempt was cut off, checked against the size the server announced and its
sha256 when the final reply names it (an ETag or X-Linked-Etag of 64 hex digits) and
for the kind of file it must be (an HTML page served with status 200 is refused), then
renamed into place. A file already in place is complete by construction, so it is skipped without any
network call, once the folder's size descriptor (OpenAI's hparams.json, Hugging Face's
config.json), if there is one, agrees with the size asked for. With no network the first
connection fails within seconds and the error says which files to fetch and where to put
them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import struct
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from diygpt.checkpointing import describe_os_error
from diygpt.errors import CheckpointError, DownloadError
from diygpt.pretrained.catalog import (
    FORMATS,
    GPT2_MODELS,
    HF_FILES,
    OPENAI_FILES,
    model_dir,
    other_size,
    size_clash,
)
from diygpt.pretrained.readers import open_safetensors
from diygpt.pretrained.tf_checkpoint import TABLE_MAGIC

OPENAI_BASE = "https://openaipublic.blob.core.windows.net"
HF_BASE = "https://huggingface.co"
TIMEOUT_S = 10.0
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# "bytes 100-199/200", "bytes 100-199/*" (total unknown), "bytes */200" (in a 416)
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:\d+-\d+|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)
_RANGE_START = re.compile(r"^\s*bytes\s+(\d+)-", re.IGNORECASE)


class UnreachableError(DownloadError):
    """The server could not be reached at all (offline, firewall, DNS)."""


class _RangeNotSatisfiable(Exception):
    """HTTP 416 to a resume: the ``.part`` is at least as long as the file (``headers``)."""

    def __init__(self, headers) -> None:
        super().__init__("HTTP 416")
        self.headers = headers


def file_urls(name: str, fmt: str = "openai", base_url: str | None = None) -> dict[str, str]:
    """File name -> URL for one model in one format.

    ``base_url`` (or ``$DIYGPT_DOWNLOAD_BASE``) replaces the scheme and host, e.g. to use
    a mirror, or a local server in tests; the paths stay those of the public sources.
    """
    if name not in GPT2_MODELS:
        raise DownloadError(f"unknown model {name!r}; choose one of {', '.join(GPT2_MODELS)}")
    if fmt not in FORMATS:
        raise DownloadError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    base = (base_url or os.environ.get("DIYGPT_DOWNLOAD_BASE") or "").rstrip("/")
    size, repo = GPT2_MODELS[name]
    if fmt == "openai":
        return {f: f"{base or OPENAI_BASE}/gpt-2/models/{size}/{f}" for f in OPENAI_FILES}
    return {f: f"{base or HF_BASE}/{repo}/resolve/main/{f}" for f in HF_FILES}


def _announced_sha256(headers: object) -> str | None:
    for key in ("X-Linked-Etag", "ETag"):
        value = (headers.get(key) or "").removeprefix("W/").strip('"').lower()  # type: ignore[attr-defined]
        if _SHA256.match(value):
            return value
    return None


def _range_total(content_range: str | None) -> int | None:
    """The complete length in a Content-Range header; None if absent, unparsable or ``*``."""
    match = _CONTENT_RANGE.match(content_range or "")
    return int(match[1]) if match and match[1] != "*" else None


def _wrong_content(part: Path, name: str) -> str | None:
    """Why the downloaded bytes are not the file ``name`` (a proxy's or sign-in page's HTML
    served with status 200, a body cut short without a length), or None. Only what can be
    checked cheaply: JSON parses, a safetensors header parses, an SSTable ends in its magic."""
    size = part.stat().st_size
    with open(part, "rb") as f:
        head = f.read(64)
        if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
            return "it is a web page (HTML)"
        if name.endswith(".json"):
            f.seek(0)
            try:
                json.loads(f.read())
            except ValueError:
                return "it is not valid JSON"
        elif name.endswith(".safetensors"):
            try:  # the loader's own header reader
                spans = open_safetensors(part).spans.values()
            except CheckpointError:
                return "its safetensors header does not parse"
            end = max((span.offset + span.nbytes for span in spans), default=size)
            if end != size:  # a body cut short without a length
                return f"it is {size} bytes, where its header says {end}"
        elif name.endswith(".index"):
            f.seek(max(size - 8, 0))
            tail = f.read(8)
            if len(tail) < 8 or struct.unpack("<Q", tail)[0] != TABLE_MAGIC:
                return "it does not end as a TensorFlow checkpoint index does"
    return None


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": "diygpt"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            raise _RangeNotSatisfiable(exc.headers) from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UnreachableError(f"cannot reach {url} ({reason})") from None


def _hash_file(path: Path, hasher: hashlib._Hash) -> None:
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            hasher.update(block)


def download_file(
    url: str,
    dest: Path,
    sha256: str | None = None,
    timeout: float = TIMEOUT_S,
    progress: bool = True,
) -> bool:
    """Fetch ``url`` into ``dest`` via ``dest.part``; False if ``dest`` already existed."""
    dest = Path(dest)
    if dest.is_file():
        return False
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    try:
        resp = _open(url, start, timeout)
    except _RangeNotSatisfiable as exc:
        if _range_total(exc.headers.get("Content-Range")) == start:
            resp = None  # the .part already holds the whole file
            sha256 = sha256 or _announced_sha256(exc.headers)
        else:  # longer than the file (a stale .part of another?) or size unknown: start over
            part.unlink()
            start = 0
            resp = _open(url, start, timeout)
    total: int | None = start
    hasher = hashlib.sha256()
    if resp is not None:
        with resp:
            if (resp.headers.get("Content-Type") or "").lower().startswith("text/html"):
                raise DownloadError(
                    f"{url}: the server sent a web page (text/html), not {dest.name}: a proxy "
                    "or sign-in page? check the network, or $DIYGPT_DOWNLOAD_BASE if set"
                )
            sha256 = sha256 or _announced_sha256(resp.headers)
            resumed = resp.status == 206
            first = _RANGE_START.match(resp.headers.get("Content-Range") or "")
            if resumed and first and int(first[1]) != start:
                part.unlink()  # appending them would make a file that never matches
                raise DownloadError(
                    f"{url}: asked to resume from byte {start}, the server sent bytes from "
                    f"{first[1]}; deleted {part.name}: run the command again to fetch it whole"
                )
            if resumed:
                total = _range_total(resp.headers.get("Content-Range"))
                length = resp.headers.get("Content-Length")
                if total is None and length and length.isdigit():  # e.g. "bytes 0-9/*"
                    total = start + int(length)
                _hash_file(part, hasher)
            else:
                start = 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length else None
            _stream(resp, part, "ab" if resumed else "wb", hasher, start, total, progress)
    else:
        _hash_file(part, hasher)
    size = part.stat().st_size
    if total is not None and size > total:
        part.unlink()
        raise DownloadError(f"{dest}: received {size} bytes, more than the file's {total}; "
                            "deleted the download, run the command again")
    if total is not None and size != total:
        raise DownloadError(
            f"{dest}: received {size} of {total} bytes; run the command again to resume"
        )
    if wrong := _wrong_content(part, dest.name):
        part.unlink()
        raise DownloadError(f"{url}: {wrong}, not {dest.name}; deleted the download (a proxy "
                            "or a wrong $DIYGPT_DOWNLOAD_BASE?); run the command again")
    if sha256 and hasher.hexdigest() != sha256.lower():
        part.unlink()
        raise DownloadError(
            f"{dest}: sha256 {hasher.hexdigest()} does not match the expected {sha256}; "
            "deleted the download, run the command again"
        )
    os.replace(part, dest)
    return True


def _stream(resp, part: Path, mode: str, hasher, start: int, total: int | None, progress: bool):
    bar = tqdm(
        total=total,
        initial=start,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=part.name.removesuffix(".part"),
        file=sys.stderr,
        disable=not progress,
    )
    with bar, open(part, mode) as out:
        try:
            while block := resp.read(_CHUNK):
                out.write(block)
                hasher.update(block)
                bar.update(len(block))
        except (OSError, http.client.HTTPException) as exc:  # reset, timeout: keep the .part
            raise DownloadError(
                f"{part}: download interrupted ({exc}); run the command again to resume"
            ) from None


def _check_folder_holds(name: str, folder: Path) -> None:
    """Refuse a folder whose size descriptor says it holds another size than ``name``.

    Files already in place are skipped unread, so without this a folder holding gpt2-small
    would be reported as holding whatever size was asked for. An absent descriptor is about
    to be downloaded, and an unreadable one is the loader's to report: neither says anything.
    """
    if found := other_size(name, folder):
        raise DownloadError(f"{folder} already holds {size_clash(name, *found)}; choose "
                            f"another folder for {name} (--dir; download_and_load_gpt2's "
                            "models_dir)")


def download(
    name: str,
    fmt: str = "openai",
    directory: Path | str | None = None,
    base_url: str | None = None,
    timeout: float = TIMEOUT_S,
    progress: bool = True,
) -> Path:
    """Download model ``name`` in format ``fmt`` (openai or hf); returns the folder."""
    urls = file_urls(name, fmt, base_url)
    folder = model_dir(name, directory)
    _check_folder_holds(name, folder)
    # The folders this call makes, deepest first, removed again if it fails leaving them empty
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(describe_os_error(exc, folder)) from None
    try:
        for file, url in urls.items():
            try:
                download_file(url, folder / file, timeout=timeout, progress=progress)
            except UnreachableError as exc:
                missing = [f for f in urls if not (folder / f).is_file()]
                raise UnreachableError(
                    f"{exc}; offline? fetch {', '.join(missing)} from {url.rsplit('/', 1)[0]}/ "
                    f"on a machine with internet and put them in {folder}"
                ) from None
    except BaseException:
        for made_dir in made:  # a .part stays, for the next try to resume
            if any(made_dir.iterdir()):
                break
            made_dir.rmdir()
        raise
    return folder
