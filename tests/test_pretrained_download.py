"""The downloader against a local HTTP server that speaks Range requests like the real ones."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from diygpt.cli import download as download_cli
from diygpt.cli.main import main
from diygpt.errors import DownloadError
from diygpt.pretrained import load_pretrained
from diygpt.pretrained.download import UnreachableError, download, download_file, file_urls

HF_DIR = Path(__file__).parent / "fixtures" / "gpt2-tiny-hf"
REPO = "/openai-community/gpt2/resolve/main/"


class _Server:
    """Serves ``files`` (URL path -> bytes) and records every request's path and Range.

    A 416 carries ``Content-Range: bytes */N`` as RFC 9110 asks (``total_in_416`` off: none);
    ``star_total`` makes a 206 say ``bytes a-b/*``, complete length unknown.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.etag: str | None = None
        self.total_in_416 = True
        self.star_total = False
        self.content_type: str | None = None
        self.ignores_range_start = False  # a 206 of the whole file, whatever was asked
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                if server.ignores_range_start:
                    start = 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    if server.total_in_416:
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    total = "*" if server.star_total else len(body)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{total}")
                if server.content_type:
                    self.send_header("Content-Type", server.content_type)
                etag = server.etag or hashlib.sha256(body).hexdigest()
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    files = {
        REPO + name: (HF_DIR / name).read_bytes() for name in ("model.safetensors", "config.json")
    }
    srv = _Server(files)
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_urls_of_the_public_sources():
    openai = file_urls("gpt2-medium", "openai")
    assert openai["model.ckpt.index"] == (
        "https://openaipublic.blob.core.windows.net/gpt-2/models/355M/model.ckpt.index"
    )
    assert set(openai) == {
        "checkpoint", "hparams.json", "model.ckpt.index",
        "model.ckpt.data-00000-of-00001", "model.ckpt.meta",
    }  # fmt: skip
    hf = file_urls("gpt2-xl", "hf")
    assert hf["model.safetensors"] == (
        "https://huggingface.co/openai-community/gpt2-xl/resolve/main/model.safetensors"
    )


def test_download_then_load(server, tmp_path):
    folder = download("gpt2-small", "hf", tmp_path, base_url=server.base, progress=False)
    assert (folder / "model.safetensors").read_bytes() == (
        HF_DIR / "model.safetensors"
    ).read_bytes()
    assert not list(folder.glob("*.part"))
    assert load_pretrained(folder).cfg.emb_dim == 32


def test_the_books_download_and_load_gpt2_from_openais_files(tmp_path, monkeypatch, capsys):
    from diygpt import download_and_load_gpt2

    openai_dir = Path(__file__).parent / "fixtures" / "gpt2-tiny-openai"  # served as 124M
    srv = _Server({f"/gpt-2/models/124M/{f.name}": f.read_bytes() for f in openai_dir.iterdir()})
    monkeypatch.setenv("DIYGPT_DOWNLOAD_BASE", srv.base)
    try:
        settings, params = download_and_load_gpt2("124M", tmp_path / "gpt2")
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
    assert settings == json.loads((openai_dir / "hparams.json").read_text())
    assert (tmp_path / "gpt2" / "124M" / "model.ckpt.index").is_file()  # the book's layout
    assert len(params["blocks"]) == 2 and params["wte"].shape == (500, 32)
    with pytest.raises(ValueError, match="'125M' is not one of 124M, 355M, 774M, 1558M"):
        download_and_load_gpt2("125M", tmp_path)


def test_resumes_from_a_part_file(server, tmp_path):
    body = server.files[REPO + "model.safetensors"]
    (tmp_path / "model.safetensors.part").write_bytes(body[:1000])
    assert download_file(
        server.base + REPO + "model.safetensors", tmp_path / "model.safetensors", progress=False
    )
    assert server.requests == [(REPO + "model.safetensors", "bytes=1000-")]
    assert (tmp_path / "model.safetensors").read_bytes() == body


def test_part_file_already_complete(server, tmp_path):
    body = server.files[REPO + "config.json"]
    (tmp_path / "config.json.part").write_bytes(body)
    download_file(server.base + REPO + "config.json", tmp_path / "config.json", progress=False)
    assert (tmp_path / "config.json").read_bytes() == body
    assert server.requests == [(REPO + "config.json", f"bytes={len(body)}-")]


def test_resume_when_the_server_does_not_say_the_total(server, tmp_path):
    server.star_total = True  # Content-Range: bytes 1000-N/*
    body = server.files[REPO + "model.safetensors"]
    (tmp_path / "model.safetensors.part").write_bytes(body[:1000])
    download_file(
        server.base + REPO + "model.safetensors", tmp_path / "model.safetensors", progress=False
    )
    assert server.requests == [(REPO + "model.safetensors", "bytes=1000-")]
    assert (tmp_path / "model.safetensors").read_bytes() == body
    assert not (tmp_path / "model.safetensors.part").exists()


@pytest.mark.parametrize("total_in_416", [True, False])
def test_a_stale_longer_part_file_is_discarded_and_fetched_again(server, tmp_path, total_in_416):
    server.total_in_416 = total_in_416
    server.etag = "not-a-sha256"  # as OpenAI's server: nothing but the size to check against
    body = server.files[REPO + "config.json"]
    stale = b"left over from another file " * 100
    assert len(stale) > len(body)
    (tmp_path / "config.json.part").write_bytes(stale)
    download_file(server.base + REPO + "config.json", tmp_path / "config.json", progress=False)
    assert (tmp_path / "config.json").read_bytes() == body
    assert server.requests == [
        (REPO + "config.json", f"bytes={len(stale)}-"),
        (REPO + "config.json", None),
    ]


def test_checksum_mismatch_is_refused_and_the_download_deleted(server, tmp_path):
    server.etag = "0" * 64
    with pytest.raises(DownloadError, match="sha256") as info:
        download_file(server.base + REPO + "config.json", tmp_path / "config.json", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "config.json").exists()
    assert not (tmp_path / "config.json.part").exists()


def test_explicit_sha256_is_checked(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256"):
        download_file(
            server.base + REPO + "config.json", tmp_path / "c.json", sha256="1" * 64, progress=False
        )


def test_complete_files_are_skipped_without_a_request(server, tmp_path):
    for name in ("model.safetensors", "config.json"):
        (tmp_path / name).write_bytes(b"already here")
    download("gpt2-small", "hf", tmp_path, base_url=server.base, progress=False)
    assert server.requests == []


def _hparams(n_embd: int, n_layer: int) -> str:
    return json.dumps({"n_vocab": 50257, "n_ctx": 1024, "n_embd": n_embd, "n_head": 12,
                       "n_layer": n_layer})  # fmt: skip


@pytest.mark.parametrize(
    ("present", "fmt"),
    [("hparams.json", "openai"), ("config.json", "hf"), ("hparams.json", "hf")],
)
def test_a_folder_holding_another_size_is_refused(
    server, tmp_path, monkeypatch, capsys, present, fmt
):
    monkeypatch.setenv("DIYGPT_DOWNLOAD_BASE", server.base)
    (tmp_path / present).write_text(_hparams(768, 12))  # gpt2-small's; config.json alike
    (tmp_path / "model.safetensors").write_bytes(b"gpt2-small's weights")
    for name in file_urls("gpt2-small", "openai"):
        if not (tmp_path / name).exists():
            (tmp_path / name).write_bytes(b"gpt2-small's")
    assert main(["download", "gpt2-medium", "--format", fmt, "--dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("diygpt: error: ")
    assert f"{tmp_path} already holds gpt2-small (its {present}" in err
    assert "choose another folder for gpt2-medium (--dir" in err
    assert server.requests == []
    assert (tmp_path / "model.safetensors").read_bytes() == b"gpt2-small's weights"


def test_a_folder_holding_the_asked_size_is_skipped(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIYGPT_DOWNLOAD_BASE", server.base)
    for name in file_urls("gpt2-medium", "openai"):
        (tmp_path / name).write_bytes(b"already here")
    (tmp_path / "hparams.json").write_text(_hparams(1024, 24))
    assert main(["download", "gpt2-medium", "--dir", str(tmp_path)]) == 0
    assert server.requests == []
    assert f"gpt2-medium (openai) is in {tmp_path}" in capsys.readouterr().out


def test_http_error_is_one_line(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download("gpt2-large", "hf", tmp_path, base_url=server.base, progress=False)


def test_unreachable_fails_fast_saying_where_to_put_files(tmp_path, monkeypatch):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens there now
    monkeypatch.setenv("DIYGPT_DOWNLOAD_BASE", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(UnreachableError) as info:
        download("gpt2-small", "openai", tmp_path / "m" / "n", progress=False)
    assert time.monotonic() - t0 < 5
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "m" / "n") in message
    assert "model.ckpt.data-00000-of-00001" in message and "hparams.json" in message
    assert not (tmp_path / "m").exists()  # the folders it made are not left behind, empty


def test_cli_command(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIYGPT_DOWNLOAD_BASE", server.base)
    parser = argparse.ArgumentParser()
    download_cli.register(parser.add_subparsers())
    args = parser.parse_args(["download", "gpt2-small", "--format", "hf", "--dir", str(tmp_path)])
    assert args.func(args) == 0
    assert str(tmp_path) in capsys.readouterr().out
    assert (tmp_path / "model.safetensors").is_file()


def test_the_cli_downloads_without_torch(server, tmp_path):
    # torch is ~190 MB of RSS and 1.5 s of start-up that fetching and checking files never use
    import subprocess
    import sys

    code = ("import sys; from diygpt.cli.main import main; "
            f"code = main(['download', 'gpt2-small', '--format', 'hf', '--dir', {str(tmp_path)!r}]); "
            "print(code, sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "DIYGPT_DOWNLOAD_BASE": server.base})
    assert done.stdout.strip().splitlines()[-1] == "0 []"
    assert (tmp_path / "model.safetensors").read_bytes() == (HF_DIR / "model.safetensors").read_bytes()


PORTAL = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", None])
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_web_page_served_as_the_file_is_refused_and_not_kept(server, tmp_path, name,
                                                               content_type):
    # a proxy's or captive portal's page with status 200: never renamed into place
    server.files[REPO + name] = PORTAL
    server.content_type = content_type
    with pytest.raises(DownloadError, match="web page"):
        download_file(server.base + REPO + name, tmp_path / name, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_body_that_is_not_the_kind_of_file_named_is_refused(server, tmp_path):
    server.files[REPO + "config.json"] = b"{ cut short"
    with pytest.raises(DownloadError, match="it is not valid JSON, not config.json"):
        download_file(server.base + REPO + "config.json", tmp_path / "config.json",
                      progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_resume_answered_from_another_byte_starts_over(server, tmp_path):
    server.ignores_range_start = True  # 206 "bytes 0-N/N" to "Range: bytes=1000-"
    body = server.files[REPO + "model.safetensors"]
    part = tmp_path / "model.safetensors.part"
    part.write_bytes(body[:1000])
    url, dest = server.base + REPO + "model.safetensors", tmp_path / "model.safetensors"
    with pytest.raises(DownloadError, match="asked to resume from byte 1000, the server sent "
                       "bytes from 0"):
        download_file(url, dest, progress=False)
    assert not part.exists()  # not appended to: the next run fetches it whole
    assert download_file(url, dest, progress=False) and dest.read_bytes() == body


def test_dir_naming_a_file_is_one_line(server, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv("DIYGPT_DOWNLOAD_BASE", server.base)
    assert main(["download", "gpt2-small", "--format", "hf", "--dir",
                 str(tmp_path / "afile" / "gpt2")]) == 2
    err = capsys.readouterr().err
    assert "afile is a file, not a folder" in err and "Traceback" not in err


def test_a_safetensors_body_cut_short_without_a_length_is_refused(tmp_path):
    # a server that closes the connection early and never said Content-Length
    from diygpt.pretrained.download import _wrong_content

    part = tmp_path / "model.safetensors.part"
    body = (HF_DIR / "model.safetensors").read_bytes()
    part.write_bytes(body)
    assert _wrong_content(part, "model.safetensors") is None
    part.write_bytes(body[:-100])
    assert _wrong_content(part, "model.safetensors") == (
        f"it is {len(body) - 100} bytes, where its header says {len(body)}")
