"""`shipyard-runtime fetch` from a real HTTPS server on 127.0.0.1, with a CA this module makes (openssl CLI), run as
the init container runs it: the real command in a process of its own, its exit code, stdout line and termination
message.

The server serves a file, a tar.gz, a zip and a tar, and misbehaves on purpose: a 404, a body cut in the middle on
the first GET (retried, resumed with Range, the content still right), a slowloris that drips one byte a second
(bounded by the low-speed limit and by the deadline), hostile archives (`../x`, `/etc/x`, a symlink to
/etc/passwd, a hard link out, 1 GiB of zeros gzipped). It counts every request, so a cache hit is seen to make none.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import secrets
import signal
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shipyard import contract
from shipyard.runtime.fetch import digests

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BOMB_BYTES = 1 << 30


# -- the server --------------------------------------------------------------------------------------------------

@dataclass
class Site:
    files: dict[str, bytes] = field(default_factory=dict)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    ranges: list[str] = field(default_factory=list)
    cut_once: set[str] = field(default_factory=set)  # paths whose first GET dies mid-body
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, method: str, path: str) -> int:
        with self.lock:
            return self.requests[(method, path)]

    def total(self) -> int:
        with self.lock:
            return sum(self.requests.values())


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(head=True)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            with site.lock:
                site.requests[(self.command, path)] += 1
            if path.startswith("/slow/"):
                return self._slowloris()
            if path.startswith("/drip-headers/"):
                return self._drip_headers()
            data = site.files.get(path)
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            start = 0
            wanted = self.headers.get("Range", "")
            if wanted.startswith("bytes=") and self.headers.get("If-Range") in (None, etag):
                start = int(wanted[6:].split("-")[0])
                with site.lock:
                    site.ranges.append(wanted)
            body = data[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if head:
                return
            if path in site.cut_once and self.command == "GET":
                with site.lock:
                    site.cut_once.discard(path)
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

        def _slowloris(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(10 << 20))
            self.end_headers()
            try:
                for _ in range(120):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(1)
            except OSError:
                pass
            self.close_connection = True

        def _drip_headers(self) -> None:
            """A slowloris of the headers: they never end, a byte a second (each socket wait returns in time)."""
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(60):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(1)
            except OSError:
                pass
            self.close_connection = True

    return Handler


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


def make_server_cert(folder: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=folder)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=folder)
    return folder / "server.pem", folder / "server.key"


@dataclass
class Https:
    base: str
    ca: Path
    other_ca: Path
    site: Site
    model_dir: Path

    def url(self, path: str) -> str:
        return self.base + path


# -- archives ----------------------------------------------------------------------------------------------------

def _model_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "shipyard-model.json").write_text('{"format": 1, "name": "m"}')
    (root / "model.safetensors").write_bytes(os.urandom(3 << 20))
    (root / "sub" / "tokenizer.json").write_text('{"v": 1}')
    return root


def _tar_bytes(root: Path, mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        tar.add(root, arcname=".")
    return buffer.getvalue()


def _zip_bytes(root: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(root).as_posix())
    return buffer.getvalue()


def _hostile_tar(kind: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        good = tarfile.TarInfo("good.txt")
        good.size = 4
        tar.addfile(good, io.BytesIO(b"good"))
        info = tarfile.TarInfo({"dotdot": "../x", "absolute": f"/tmp/shipyard-fetch-{kind}-x",
                                "symlink": "passwd", "hardlink": "shadow"}[kind])
        if kind in ("dotdot", "absolute"):
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        elif kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.type, info.linkname = tarfile.LNKTYPE, "../../etc/shadow"
            tar.addfile(info)
    return buffer.getvalue()


def _bomb() -> bytes:
    """A tar.gz of one member, `zeros.bin`, of 1 GiB of zeros (about 1 MB): gzip members of 1 MiB of zeros one
    after another (a gzip stream may hold several members, and Python's gzip reads them all)."""
    header = tarfile.TarInfo("zeros.bin")
    header.size = BOMB_BYTES
    block = gzip.compress(b"\x00" * (1 << 20), 9)
    return gzip.compress(header.tobuf(format=tarfile.GNU_FORMAT)) + block * (BOMB_BYTES >> 20) + \
        gzip.compress(b"\x00" * 1024)


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Https]:
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca(folder / "ca", "shipyard-test-ca")
    other = make_ca(folder / "other", "another-ca")
    cert, key = make_server_cert(folder, ca)
    model_dir = _model_tree(folder / "model")
    site = Site()
    site.files.update({
        "/files/model.safetensors": (model_dir / "model.safetensors").read_bytes(),
        "/files/model.tar.gz": _tar_bytes(model_dir, "w:gz"),
        "/files/model.tgz": _tar_bytes(model_dir, "w:gz"),
        "/files/model.tar": _tar_bytes(model_dir, "w"),
        "/files/model.zip": _zip_bytes(model_dir),
        "/dies/model.safetensors": os.urandom(8 << 20),
        "/hostile/bomb.tar.gz": _bomb(),
        **{f"/hostile/{kind}.tar.gz": _hostile_tar(kind) for kind in ("dotdot", "absolute", "symlink", "hardlink")},
    })
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(site))
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Https(f"https://127.0.0.1:{server.server_address[1]}", ca[0], other[0], site, model_dir)
    finally:
        server.shutdown()
        server.server_close()


# -- running fetch -----------------------------------------------------------------------------------------------

@dataclass
class Run:
    code: int
    line: str
    log: str
    termination: str
    seconds: float


def run_fetch(environment: dict[str, str], *args: str, timeout: float) -> Run:
    """`shipyard-runtime fetch` as a process of its own with exactly ``environment`` (which names its termination
    log); the S3 tests run it the same way."""
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "shipyard.runtime.cli", "fetch", *args], capture_output=True,
                         text=True, timeout=timeout, env=environment)
    term = Path(environment[contract.ENV_TERMINATION_LOG])
    return Run(out.returncode, out.stdout.strip(), out.stderr, term.read_text().strip() if term.exists() else "",
               time.monotonic() - started)


def fetch(tmp_path: Path, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Run:
    term = tmp_path / f"termination-{secrets.token_hex(4)}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHIPYARD_"))}
    environment.update({"PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("contract", "runtime")),
                        contract.ENV_TERMINATION_LOG: str(term), **(env or {})})
    return run_fetch(environment, *args, timeout=timeout)


def test_a_file_is_fetched_verified_and_reported(https: Https, tmp_path: Path) -> None:
    data = https.site.files["/files/model.safetensors"]
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    run = fetch(tmp_path, "--uri", https.url("/files/model.safetensors"), "--dest", str(tmp_path / "m"),
                "--ca-bundle", str(https.ca), "--digest", digest)
    assert run.code == 0, run.log
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == data
    assert run.line == run.termination
    assert run.line.startswith(f"Fetched {https.url('/files/model.safetensors')} into {tmp_path / 'm'}: 1 file, "
                               "3.0 MiB in ")
    fields = contract.parse_fetch_summary_fields(run.termination)
    assert fields == {"bytes": len(data), "files": 1, "seconds": fields["seconds"], "downloadedBytes": len(data),
                      "digest": digest, "cacheHit": False}
    assert digests.compute_digest(tmp_path / "m" / "model.safetensors") == digest


@pytest.mark.parametrize("name", ["model.tar.gz", "model.tgz", "model.tar", "model.zip"])
def test_archives_are_extracted(https: Https, tmp_path: Path, name: str) -> None:
    digest = digests.compute_digest(https.model_dir)
    run = fetch(tmp_path, "--uri", https.url(f"/files/{name}"), "--dest", str(tmp_path / "m"),
                "--ca-bundle", str(https.ca), "--digest", digest)
    assert run.code == 0, run.log
    assert (tmp_path / "m" / "sub" / "tokenizer.json").read_text() == '{"v": 1}'
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (https.model_dir / "model.safetensors").read_bytes()
    assert digests.compute_digest(tmp_path / "m") == digest
    assert not list(tmp_path.glob(".m.shipyard-fetch-*")), "staging left behind"
    assert f"Extracted {name}: 3 files" in run.log


@pytest.mark.parametrize("existing", [False, True])
def test_a_digest_mismatch_leaves_nothing_at_dest(https: Https, tmp_path: Path, existing: bool) -> None:
    dest = tmp_path / "m"
    if existing:  # a volume's mount point: staged inside, never left half-filled
        dest.mkdir()
    wrong = "sha256:" + "0" * 64
    run = fetch(tmp_path, "--uri", https.url("/files/model.zip"), "--dest", str(dest), "--ca-bundle", str(https.ca),
                "--digest", wrong)
    assert run.code == 1
    got = digests.compute_digest(https.model_dir)
    assert run.line == (f"Fetch of {https.url('/files/model.zip')} failed: digest mismatch: expected {wrong}, got "
                        f"{got} ({https.url('/files/model.zip')})")
    assert run.termination == run.line
    assert (list(dest.iterdir()) == []) if existing else not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("termination")) == \
        (["m"] if existing else [])


@pytest.mark.parametrize("ca", ["other", "system"])
def test_a_server_of_another_ca_is_refused(https: Https, tmp_path: Path, ca: str) -> None:
    args = ["--ca-bundle", str(https.other_ca)] if ca == "other" else []
    run = fetch(tmp_path, "--uri", https.url("/files/model.safetensors"), "--dest", str(tmp_path / "m"), *args)
    assert run.code == 1
    assert "TLS certificate verification failed" in run.line and https.url("/files/model.safetensors") in run.line
    assert not (tmp_path / "m").exists()


def test_not_found_is_named_and_not_retried(https: Https, tmp_path: Path) -> None:
    before = https.site.count("GET", "/files/missing.bin")
    run = fetch(tmp_path, "--uri", https.url("/files/missing.bin?X-Amz-Signature=SECRETSIG"), "--dest",
                str(tmp_path / "m"), "--ca-bundle", str(https.ca))
    assert run.code == 1
    assert run.line == f"Fetch of {https.url('/files/missing.bin')} failed: not found (404): " \
                       f"{https.url('/files/missing.bin')}"
    assert "SECRETSIG" not in run.line + run.log + run.termination
    assert https.site.count("GET", "/files/missing.bin") == before + 1


def test_a_body_cut_in_the_middle_is_resumed(https: Https, tmp_path: Path) -> None:
    path = "/dies/model.safetensors"
    https.site.cut_once.add(path)
    before = https.site.count("GET", path)
    run = fetch(tmp_path, "--uri", https.url(path), "--dest", str(tmp_path / "m"), "--ca-bundle", str(https.ca))
    assert run.code == 0, run.log
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == https.site.files[path]
    assert https.site.count("GET", path) == before + 2
    assert https.site.ranges[-1] == f"bytes={len(https.site.files[path]) // 2}-"
    half = len(https.site.files[path]) // 2
    assert f"Attempt 1/6 (GET) failed: connection broken after {half} of {2 * half} bytes of" in run.log
    assert f"Resuming {https.url(path)} at byte {half}" in run.log


def test_a_slowloris_is_bounded_by_the_low_speed_limit(https: Https, tmp_path: Path) -> None:
    run = fetch(tmp_path, "--uri", https.url("/slow/model.bin"), "--dest", str(tmp_path / "m"), "--ca-bundle",
                str(https.ca), "--timeout", "2", "--retries", "1", "--deadline", "60")
    assert run.code == 1
    assert re.search(rf"failed: timed out after [23] s reading {re.escape(https.url('/slow/model.bin'))} \(slow "
                     r"server: [1-4] bytes in the last [23] s\)", run.line), run.line
    assert "(after 2 attempts)" in run.line
    assert run.seconds < 2 * (2 + 1.5) + 0.5 + 5  # two windows of ~2 s, one backoff of at most 0.5 s, start-up
    assert not (tmp_path / "m").exists()


def test_a_slowloris_is_bounded_by_the_deadline(https: Https, tmp_path: Path) -> None:
    run = fetch(tmp_path, "--uri", https.url("/slow/model.bin"), "--dest", str(tmp_path / "m"), "--ca-bundle",
                str(https.ca), "--timeout", "30", "--deadline", "3")
    assert run.code == 1
    assert run.line == f"Fetch of {https.url('/slow/model.bin')} failed: deadline of 3 s exceeded fetching " \
                       f"{https.url('/slow/model.bin')} (--deadline)"
    assert run.seconds < 3 + 5


def test_headers_that_never_end_are_stopped_by_the_watchdog(https: Https, tmp_path: Path) -> None:
    url = https.url("/drip-headers/model.bin")
    run = fetch(tmp_path, "--uri", url, "--dest", str(tmp_path / "m"), "--ca-bundle", str(https.ca),
                "--timeout", "30", "--deadline", "2")
    assert run.code == 1
    assert run.line == f"Fetch of {url} failed: deadline of 2 s exceeded fetching {url} (--deadline; stopped: a " \
                       "request did not return)"
    assert run.termination == run.line
    assert run.seconds < 2 + 5 + 5
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(("kind", "entry"), [
    ("dotdot", "refused archive entry '../x': '..' in path"),
    ("absolute", "refused archive entry '/tmp/shipyard-fetch-absolute-x': absolute path"),
    ("symlink", "refused archive entry 'passwd': symbolic link to '/etc/passwd' points outside the model"),
    ("hardlink", "refused archive entry 'shadow': hard link to '../../etc/shadow' points outside the model"),
])
def test_hostile_archives_are_refused_naming_the_entry(https: Https, tmp_path: Path, kind: str, entry: str) -> None:
    dest = tmp_path / "deep" / "m"
    run = fetch(tmp_path, "--uri", https.url(f"/hostile/{kind}.tar.gz"), "--dest", str(dest), "--ca-bundle",
                str(https.ca))
    assert run.code == 1
    assert entry in run.line
    assert not dest.exists()
    assert not (tmp_path / "deep" / "x").exists() and not (tmp_path / "x").exists()
    assert not Path("/tmp/shipyard-fetch-absolute-x").exists()
    assert list((tmp_path / "deep").iterdir()) == []


@pytest.mark.parametrize(("flags", "reason"), [
    ((), f"{BOMB_BYTES} bytes extracted from an archive of"),
    (("--max-compression-ratio", "0", "--max-extracted-bytes", "100Mi"),
     f"extracting it would write {BOMB_BYTES} bytes, above the limit of {100 << 20} bytes (--max-extracted-bytes)"),
])
def test_a_decompression_bomb_is_refused_before_it_is_written(https: Https, tmp_path: Path, flags: tuple[str, ...],
                                                              reason: str) -> None:
    archive_size = len(https.site.files["/hostile/bomb.tar.gz"])
    assert archive_size < 2 << 20
    run = fetch(tmp_path, "--uri", https.url("/hostile/bomb.tar.gz"), "--dest", str(tmp_path / "m"), "--ca-bundle",
                str(https.ca), *flags)
    assert run.code == 1
    assert "refused archive entry 'zeros.bin': " in run.line and reason in run.line
    assert not (tmp_path / "m").exists()
    assert run.seconds < 30


def test_a_cache_hit_downloads_nothing_and_still_asks_the_source(https: Https, tmp_path: Path) -> None:
    """A hit costs one HEAD (the pod's access is checked at the source: the cache is shared, a digest is no
    credential) and no GET."""
    path = "/files/model.tar.gz"
    digest = digests.compute_digest(https.model_dir)
    cache = tmp_path / "cache"
    first = fetch(tmp_path, "--uri", https.url(path), "--dest", str(tmp_path / "a"), "--ca-bundle", str(https.ca),
                  "--digest", digest, "--cache", str(cache))
    assert first.code == 0, first.log
    assert contract.parse_fetch_summary_fields(first.line)["cacheHit"] is False
    gets, heads = https.site.count("GET", path), https.site.count("HEAD", path)
    second = fetch(tmp_path, "--uri", https.url(path), "--dest", str(tmp_path / "b"), "--ca-bundle", str(https.ca),
                   "--digest", digest, "--cache", str(cache))
    assert second.code == 0, second.log
    assert (https.site.count("GET", path), https.site.count("HEAD", path)) == (gets, heads + 1)
    fields = contract.parse_fetch_summary_fields(second.termination)
    assert fields["cacheHit"] is True and fields["downloadedBytes"] == 0 and fields["digest"] == digest
    assert digests.compute_digest(tmp_path / "b") == digest
    # the files are hard links to the read-only entry (one filesystem here)
    entry = cache / "trees" / digest.replace(":", "-") / "model.safetensors"
    assert (tmp_path / "b" / "model.safetensors").stat().st_ino == entry.stat().st_ino


def test_without_a_digest_the_cache_costs_one_head(https: Https, tmp_path: Path) -> None:
    path = "/files/model.zip"
    cache = tmp_path / "cache"
    first = fetch(tmp_path, "--uri", https.url(path), "--dest", str(tmp_path / "a"), "--ca-bundle", str(https.ca),
                  "--cache", str(cache))
    assert first.code == 0, first.log
    gets, heads = https.site.count("GET", path), https.site.count("HEAD", path)
    second = fetch(tmp_path, "--uri", https.url(path), "--dest", str(tmp_path / "b"), "--ca-bundle", str(https.ca),
                   "--cache", str(cache))
    assert second.code == 0, second.log
    assert (https.site.count("GET", path), https.site.count("HEAD", path)) == (gets, heads + 1)
    assert contract.parse_fetch_summary_fields(second.line)["cacheHit"] is True


def test_concurrent_fetchers_of_one_key_download_once(https: Https, tmp_path: Path) -> None:
    path = "/files/model.tgz"
    digest = digests.compute_digest(https.model_dir)
    before = https.site.count("GET", path)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHIPYARD_"))}
    environment["PYTHONPATH"] = os.pathsep.join(str(ROOT / p) for p in ("contract", "runtime"))
    environment[contract.ENV_TERMINATION_LOG] = ""
    procs = [subprocess.Popen([sys.executable, "-m", "shipyard.runtime.cli", "fetch", "--uri", https.url(path),
                               "--dest", str(tmp_path / f"d{i}"), "--ca-bundle", str(https.ca), "--digest", digest,
                               "--cache", str(tmp_path / "cache")], env=environment, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    assert https.site.count("GET", path) == before + 1
    assert sum("cacheHit=true" in out for out, _ in outputs) == 3
    for i in range(4):
        assert digests.compute_digest(tmp_path / f"d{i}") == digest


def test_sigterm_mid_download_leaves_nothing(https: Https, tmp_path: Path) -> None:
    dest = tmp_path / "mnt"
    dest.mkdir()  # an emptyDir mount point
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHIPYARD_"))}
    environment["PYTHONPATH"] = os.pathsep.join(str(ROOT / p) for p in ("contract", "runtime"))
    environment[contract.ENV_TERMINATION_LOG] = str(tmp_path / "term")
    proc = subprocess.Popen([sys.executable, "-m", "shipyard.runtime.cli", "fetch", "--uri",
                             https.url("/slow/model.bin"), "--dest", str(dest), "--ca-bundle", str(https.ca)],
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not list(dest.glob(".shipyard-fetch-stage-*/model/model.bin")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "failed: interrupted by SIGTERM" in out
    assert list(dest.iterdir()) == []


def test_a_directory_fetch_wrote_is_replaced_or_kept(https: Https, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    digest = digests.compute_digest(https.model_dir)
    first = fetch(tmp_path, "--uri", https.url("/files/model.tar"), "--dest", str(dest), "--ca-bundle", str(https.ca))
    assert first.code == 0, first.log
    before = https.site.total()
    again = fetch(tmp_path, "--uri", https.url("/files/model.tar"), "--dest", str(dest), "--ca-bundle", str(https.ca),
                  "--digest", digest)
    assert again.code == 0 and "already holds" in again.line and https.site.total() == before
    other = "/files/model.safetensors"
    replaced = fetch(tmp_path, "--uri", https.url(other), "--dest", str(dest), "--ca-bundle", str(https.ca))
    assert replaced.code == 0, replaced.log
    assert sorted(p.name for p in dest.iterdir()) == [".shipyard-fetch.json", "model.safetensors"]
    assert (dest / "model.safetensors").read_bytes() == https.site.files[other]
