"""`shipyard-runtime fetch`, its pure parts table by table: URIs, relative paths, the digest of a listing (and its
coreutils equivalent), archive entry checks and the extraction budget, the backoff schedule and the retry loop,
error messages, S3 parts and prefixes, flags and environment, the summary line and its fields; then the small
file-system parts on tmp_path: extraction of crafted archives, destinations, staging sweeps, the cache.

The real sources (a TLS server on 127.0.0.1, versitygw) are in tests/integration/test_fetch_https.py and
test_fetch_s3.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest

from shipyard import contract
from shipyard.runtime import cli
from shipyard.runtime.fetch import (
    archives,
    cache,
    command,
    digests,
    errors,
    plan,
    progress,
    retry,
    s3,
    sources,
    staging,
)
from shipyard.runtime.fetch.errors import ArchiveError, FetchError, UsageError

ROOT = Path(__file__).resolve().parents[2]
HEX = "ab" * 32


# -- URIs --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("uri", "scheme", "bucket", "key", "display", "name", "prefix"), [
    ("s3://models/digits/model.safetensors", "s3", "models", "digits/model.safetensors",
     "s3://models/digits/model.safetensors", "model.safetensors", False),
    ("s3://models/digits/", "s3", "models", "digits/", "s3://models/digits/", "digits", True),
    ("s3://models/digits", "s3", "models", "digits", "s3://models/digits", "digits", False),
    ("s3://models", "s3", "models", "", "s3://models/", "", True),
    ("s3://models/", "s3", "models", "", "s3://models/", "", True),
    ("S3://models/a b/c", "s3", "models", "a b/c", "s3://models/a b/c", "c", False),
    ("https://example.com/m/model.tar.gz?X-Amz-Signature=SECRET&X-Amz-Credential=AKIA",
     "https", "", "", "https://example.com/m/model.tar.gz", "model.tar.gz", False),
    ("https://127.0.0.1:8443/weights%20v2.bin", "https", "", "", "https://127.0.0.1:8443/weights%20v2.bin",
     "weights v2.bin", False),
    ("https://[::1]:9000/m.zip#frag", "https", "", "", "https://[::1]:9000/m.zip", "m.zip", False),
])
def test_parse_uri(uri: str, scheme: str, bucket: str, key: str, display: str, name: str, prefix: bool) -> None:
    source = sources.parse_uri(uri)
    assert (source.scheme, source.bucket, source.key) == (scheme, bucket, key)
    assert source.display == display
    assert source.name == name
    assert source.is_prefix is prefix
    assert "SECRET" not in source.display and "AKIA" not in source.display


@pytest.mark.parametrize(("uri", "allow_http", "message"), [
    ("", False, "--uri is required"),
    ("gs://bucket/model", False, "unsupported URI gs://"),
    ("/models/digits", False, "unsupported URI a URI without a scheme"),
    ("http://example.com/m.bin", False, "plain http is refused (http://example.com/m.bin)"),
    ("https://user:hunter2@example.com/m.bin", False, "credentials in the URI are refused"),
    ("https://token@example.com/m.bin", False, "credentials in the URI are refused"),
    ("s3://AKIA:hunter2@bucket/key", False, "no credentials, no endpoint"),
    ("s3://b/key", False, "invalid bucket name 'b'"),
    ("s3://bucket/a\nb", False, "control characters"),
    ("https:///path", False, "no host"),
    ("https://example.com:99999/x", False, "invalid URL"),
])
def test_parse_uri_refusals(uri: str, allow_http: bool, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        sources.parse_uri(uri, allow_http=allow_http)
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_plain_http_with_the_flag() -> None:
    assert sources.parse_uri("http://127.0.0.1:8080/m.bin", allow_http=True).display == "http://127.0.0.1:8080/m.bin"


@pytest.mark.parametrize(("name", "expected"), [
    ("model.safetensors", "model.safetensors"),
    ("./model/weights.bin", "model/weights.bin"),
    ("a//b/./c", "a/b/c"),
    ("dir/", "dir"),
    ("../x", "'..' in path"),
    ("a/../../x", "'..' in path"),
    ("/etc/x", "absolute path"),
    ("a\\..\\x", "backslash in path"),
    ("a\nb", "control character in path"),
    ("", "empty path"),
    ("./", "empty path"),
    (".shipyard-fetch.json", "name reserved by fetch"),
    ("sub/.shipyard-fetch.json", "sub/.shipyard-fetch.json"),
])
def test_check_relative_path(name: str, expected: str) -> None:
    try:
        got = sources.check_relative_path(name)
    except ValueError as error:
        got = str(error)
    assert expected in got


# -- digests -----------------------------------------------------------------------------------------------------

def test_listing_is_sorted_by_utf8_bytes_in_sha256sum_format() -> None:
    listing = digests.build_listing([("b.bin", "2" * 64), ("a/z.txt", "1" * 64), ("B.bin", "3" * 64),
                                     ("é.txt", "4" * 64)])
    assert listing == (f"{'3' * 64}  B.bin\n{'1' * 64}  a/z.txt\n{'2' * 64}  b.bin\n{'4' * 64}  é.txt\n").encode()
    assert digests.build_listing_digest([]) == "sha256:" + hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize(("text", "expected"), [
    (f"sha256:{HEX}", f"sha256:{HEX}"),
    (f"SHA256:{HEX.upper()}", f"sha256:{HEX}"),
    (f" sha256:{HEX} ", f"sha256:{HEX}"),
    (HEX, "is not sha256:<64 hex digits>"),
    (f"md5:{HEX}", "is not sha256:<64 hex digits>"),
    (f"sha256:{HEX[:-1]}", "is not sha256:<64 hex digits>"),
    (f"sha256:{HEX[:-1]}g", "is not sha256:<64 hex digits>"),
])
def test_check_digest(text: str, expected: str) -> None:
    try:
        got = digests.check_digest(text)
    except ValueError as error:
        got = str(error)
    assert expected in got


def _tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(5000))
    (root / "sub" / "config.json").write_text('{"a": 1}')
    (root / "sub" / "deeper" / "é x.bin").write_bytes(b"\x00" * 10)
    (root / "empty").mkdir()
    (root / "link.json").symlink_to("sub/config.json")
    (root / ".shipyard-fetch.json").write_text("{}")  # fetch's record: not part of the model


def test_directory_digest_matches_coreutils(tmp_path: Path) -> None:
    _tree(tmp_path)
    script = ("cd \"$1\" && find -L . -type f ! -path './.shipyard-fetch*' -printf '%P\\n' | LC_ALL=C sort "
              "| xargs -r -d '\\n' sha256sum | sha256sum")
    out = subprocess.run(["bash", "-c", script, "-", str(tmp_path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert digests.compute_digest(tmp_path) == "sha256:" + out.stdout.split()[0]
    entries = digests.list_tree(tmp_path)
    assert [e.path for e in entries] == ["link.json", "model.safetensors", "sub/config.json", "sub/deeper/é x.bin"]
    assert digests.compute_digest(tmp_path / "model.safetensors") == \
        "sha256:" + hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize(("make", "message"), [
    (lambda r: (r / "out").symlink_to("/etc/hostname"), "out: symbolic link points outside the directory"),
    (lambda r: (r / "d").symlink_to("sub"), "d: a symbolic link to a directory is not supported"),
    (lambda r: os.mkfifo(r / "pipe"), "pipe: not a regular file"),
])
def test_directory_digest_refusals(tmp_path: Path, make: Any, message: str) -> None:
    (tmp_path / "sub").mkdir()
    make(tmp_path)
    with pytest.raises(FetchError, match=message):
        digests.list_tree(tmp_path)


def test_print_digest_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tree(tmp_path)
    assert cli.main(["fetch", "--print-digest", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == digests.compute_digest(tmp_path)
    assert cli.main(["fetch", "--print-digest", str(tmp_path / "missing")]) == 1
    assert "no such file or directory" in capsys.readouterr().err


# -- archives ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("entry", "expected"), [
    (archives.Entry("model/weights.bin", "file", 10), "model/weights.bin"),
    (archives.Entry("./", "directory"), ""),
    (archives.Entry("lib/current", "symlink", linkname="v2/model.bin"), "lib/current"),
    (archives.Entry("lib/up", "symlink", linkname="../model.bin"), "lib/up"),
    (archives.Entry("model/link", "hardlink", linkname="model/weights.bin"), "model/link"),
    (archives.Entry("../x", "file", 1), "refused archive entry '../x': '..' in path"),
    (archives.Entry("/etc/x", "file", 1), "refused archive entry '/etc/x': absolute path"),
    (archives.Entry("passwd", "symlink", linkname="/etc/passwd"),
     "refused archive entry 'passwd': symbolic link to '/etc/passwd' points outside the model (absolute)"),
    (archives.Entry("a/escape", "symlink", linkname="../../etc"),
     "refused archive entry 'a/escape': symbolic link to '../../etc' points outside the model"),
    (archives.Entry("shadow", "hardlink", linkname="/etc/shadow"),
     "refused archive entry 'shadow': hard link to '/etc/shadow' points outside the model (absolute path)"),
    (archives.Entry("h", "hardlink", linkname="../outside"),
     "refused archive entry 'h': hard link to '../outside' points outside the model ('..' in path)"),
    (archives.Entry("dev/sda", "device"), "refused archive entry 'dev/sda': device file"),
    (archives.Entry("pipe", "fifo"), "refused archive entry 'pipe': FIFO"),
    (archives.Entry("sock", "other"), "refused archive entry 'sock': not a file, directory or link"),
    (archives.Entry(".shipyard-fetch.json", "file"), "name reserved by fetch"),
])
def test_check_entry(entry: archives.Entry, expected: str) -> None:
    try:
        got = archives.check_entry(entry)
    except ArchiveError as error:
        got = str(error)
    assert got == expected or (expected and expected in got)


@pytest.mark.parametrize(("name", "kind"), [
    ("model.tar", "tar"), ("m.tar.gz", "tar"), ("m.TGZ", "tar"), ("m.tar.xz", "tar"), ("m.tar.bz2", "tar"),
    ("m.zip", "zip"), ("model.safetensors", None), ("m.gz", None), ("tar", None),
])
def test_archive_kind(name: str, kind: str | None) -> None:
    assert archives.archive_kind(name) == kind


@pytest.mark.parametrize(("archive_bytes", "sizes", "max_bytes", "max_ratio", "refused", "message"), [
    (100 << 20, [10 << 20, 20 << 20], 64 << 30, 200, None, ""),
    (100, [50, 60], 100, 200, "b", "above the limit of 100 bytes (--max-extracted-bytes)"),
    (1 << 20, [15 << 20, 100 << 20], 64 << 30, 100, "b", "compression ratio of 115, above 100"),
    (1 << 10, [15 << 20], 64 << 30, 100, None, ""),  # under the 16 MiB floor: small compressible files pass
    (1 << 20, [1 << 30], 64 << 30, 0, None, ""),  # ratio off
])
def test_budget(archive_bytes: int, sizes: list[int], max_bytes: int, max_ratio: float, refused: str | None,
                message: str) -> None:
    budget = archives.Budget(archive_bytes, max_bytes, max_ratio)
    names = iter("abcdef")
    try:
        for size in sizes:
            name = next(names)
            budget.add(name, size)
        got = None
    except ArchiveError as error:
        got = name
        assert f"refused archive entry '{name}'" in str(error) and message in str(error)
    assert got == refused


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


@pytest.mark.parametrize(("members", "message"), [
    ([(_info("ok.txt"), b"fine"), (_info("../x"), b"boom")], "refused archive entry '../x': '..' in path"),
    ([(_info("/etc/x"), b"boom")], "refused archive entry '/etc/x': absolute path"),
    ([(_info("passwd", tarfile.SYMTYPE, "/etc/passwd"), None)], "'/etc/passwd' points outside the model"),
    ([(_info("shadow", tarfile.LNKTYPE, "../../etc/shadow"), None)], "hard link to '../../etc/shadow'"),
    ([(_info("null", tarfile.CHRTYPE), None)], "refused archive entry 'null': device file"),
    ([(_info("a.txt"), b"1"), (_info("./a.txt"), b"2")], "refused archive entry './a.txt': the same path twice"),
    # the data filter behind the checks: a link inside, then a file written through it to outside
    ([(_info("d", tarfile.SYMTYPE, "."), None)], "symbolic link to '.' points outside the model"),
])
def test_extract_tar_refusals(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]],
                              message: str) -> None:
    archive = _tar(tmp_path / "m.tar.gz", members)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ArchiveError, match=message.replace("(", r"\(").replace(")", r"\)")):
        archives.extract(archive, "tar", target, max_bytes=1 << 30, max_ratio=200)
    assert not (tmp_path / "x").exists()


def test_extract_tar_keeps_links_inside(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "m.tar", [(_info("./", tarfile.DIRTYPE), None), (_info("v2/model.bin"), b"weights"),
                                        (_info("current", tarfile.SYMTYPE, "v2/model.bin"), None),
                                        (_info("copy.bin", tarfile.LNKTYPE, "v2/model.bin"), None)], mode="w")
    target = tmp_path / "out"
    target.mkdir()
    assert archives.extract(archive, "tar", target, max_bytes=1 << 30, max_ratio=200) == 7
    assert (target / "current").read_bytes() == b"weights" and os.readlink(target / "current") == "v2/model.bin"
    assert (target / "copy.bin").read_bytes() == b"weights"


def _zip(path: Path, entries: list[tuple[str, bytes, int]]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": made on purpose
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize(("entries", "message"), [
    ([("ok.txt", b"1", 0o100644), ("../evil", b"x", 0o100644)], "refused archive entry '../evil': '..' in path"),
    ([("/abs", b"x", 0o100644)], "refused archive entry '/abs': absolute path"),
    ([("..\\evil", b"x", 0o100644)], "backslash in path"),
    ([("link", b"/etc/passwd", 0o120777)], "refused archive entry 'link': symbolic links in zip archives"),
    ([("a", b"1", 0o100644), ("a", b"2", 0o100644)], "refused archive entry 'a': the same path twice"),
])
def test_extract_zip_refusals(tmp_path: Path, entries: list[tuple[str, bytes, int]], message: str) -> None:
    archive = _zip(tmp_path / "m.zip", entries)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ArchiveError, match=message.replace("(", r"\(").replace(")", r"\)")):
        archives.extract(archive, "zip", target, max_bytes=1 << 30, max_ratio=200)
    assert not (tmp_path / "evil").exists()


def test_extract_zip_bomb_by_ratio(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "bomb.zip", [("zeros.bin", b"\x00" * (64 << 20), 0o100644)])
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ArchiveError, match="refused archive entry 'zeros.bin': .* compression ratio of"):
        archives.extract(archive, "zip", target, max_bytes=1 << 40, max_ratio=200)
    assert list(target.iterdir()) == []


def test_extract_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "m.tar.gz"
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ArchiveError, match="m.tar.gz: not a valid tar archive"):
        archives.extract(path, "tar", tmp_path, max_bytes=1 << 30, max_ratio=200)


# -- retries -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("retries", "jitter", "expected"), [
    (5, [0.0] * 5, [0.25, 0.5, 1.0, 2.0, 4.0]),
    (5, [0.999999] * 5, [0.5, 1.0, 2.0, 4.0, 8.0]),
    (8, [0.0] * 8, [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]),  # capped at 20 s: half of it at least
    (0, [], []),
])
def test_backoff_schedule(retries: int, jitter: list[float], expected: list[float]) -> None:
    assert [round(d, 3) for d in retry.build_backoff_delays(retries, jitter=jitter)] == expected


def test_backoff_jitter_spreads_within_bounds() -> None:
    for attempt, delay in enumerate(retry.build_backoff_delays(6)):
        step = min(retry.CAP_S, retry.BASE_S * 2 ** attempt)
        assert step / 2 <= delay < step


@pytest.mark.parametrize(("failures", "retries", "outcome"), [
    ([], 3, "ok after 1"),
    ([FetchError("server error (503) from x", retryable=True)] * 2, 3, "ok after 3"),
    ([FetchError("server error (503) from x", retryable=True)] * 4, 3, "server error (503) from x (after 4 attempts)"),
    ([FetchError("access denied (403) to x")], 3, "access denied (403) to x"),
    ([FetchError("connection reset to x", retryable=True), FetchError("not found (404): x")], 3, "not found (404): x"),
])
def test_run_with_retries(failures: list[FetchError], retries: int, outcome: str) -> None:
    calls: list[int] = []

    def action(attempt: int) -> str:
        calls.append(attempt)
        if attempt < len(failures):
            raise FetchError(failures[attempt].message, retryable=failures[attempt].retryable)
        return f"ok after {attempt + 1}"

    try:
        got = retry.run_with_retries(action, retries=retries, deadline=retry.Deadline(60), display="x",
                                     delays=[0.0] * retries)
    except FetchError as error:
        got = str(error)
    assert got == outcome
    assert calls == list(range(len(calls)))


def test_retries_stop_at_the_deadline() -> None:
    def action(attempt: int) -> None:
        raise FetchError("connection refused to x", retryable=True)

    with pytest.raises(FetchError, match="no time left to retry within the deadline of 1 s"):
        retry.run_with_retries(action, retries=5, deadline=retry.Deadline(1), display="x", delays=[30.0] * 5)


def test_cancel_interrupts_a_backoff() -> None:
    deadline = retry.Deadline(60)
    threading.Timer(0.1, deadline.cancel.set).start()
    with pytest.raises(errors.Interrupted):
        deadline.sleep(30, "x")


# -- messages ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "code", "message", "retryable"), [
    (403, "AccessDenied", "access denied (403) to s3://b/k", False),
    (403, "SignatureDoesNotMatch", "access denied (403) to s3://b/k: SignatureDoesNotMatch", False),
    (403, "403", "access denied (403) to s3://b/k", False),
    (404, "NoSuchKey", "not found (404): s3://b/k", False),
    (401, None, "unauthorized (401) for s3://b/k", False),
    (500, None, "server error (500) from s3://b/k", True),
    (503, "SlowDown", "server error (503) from s3://b/k: SlowDown", True),
    (429, None, "too many requests (429) from s3://b/k", True),
    (408, None, "request timeout (408) from s3://b/k", True),
    (418, None, "HTTP 418 from s3://b/k", False),
])
def test_status_messages(status: int, code: str | None, message: str, retryable: bool) -> None:
    assert errors.build_status_message(status, "s3://b/k", code) == message
    assert errors.is_retryable_status(status) is retryable


def test_timeout_and_mismatch_messages() -> None:
    assert errors.build_timeout_message(30, "https://h/p", "slow server") == \
        "timed out after 30 s reading https://h/p (slow server)"
    assert errors.build_digest_mismatch_message("sha256:aa", "sha256:bb", "s3://b/k") == \
        "digest mismatch: expected sha256:aa, got sha256:bb (s3://b/k)"


def test_describe_exception_never_shows_the_url() -> None:
    import ssl

    import urllib3

    from shipyard.runtime.fetch import https

    error = urllib3.exceptions.SSLError(ssl.SSLCertVerificationError(1, "certificate verify failed"))
    assert https.describe_exception(error).startswith("TLS certificate verification failed")
    refused = urllib3.exceptions.NewConnectionError(None, "https://h/p?sig=SECRET: refused")  # type: ignore[arg-type]
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert https.describe_exception(refused) == "connection refused"


# -- S3 ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "part", "expected"), [
    (0, 16, []),
    (10, 16, [(0, 9)]),
    (16, 16, [(0, 15)]),
    (33, 16, [(0, 15), (16, 31), (32, 32)]),
])
def test_build_parts(size: int, part: int, expected: list[tuple[int, int]]) -> None:
    assert s3.build_parts(size, part) == expected


@pytest.mark.parametrize(("keys", "expected"), [
    (["m/a.bin", "m/sub/b.json", "m/sub/"], {"m/a.bin": "a.bin", "m/sub/b.json": "sub/b.json"}),
    (["m/../../etc/cron.d/x"], "refused object s3://b/m/../../etc/cron.d/x: '..' in path"),
    (["m//abs"], "refused object s3://b/m//abs: absolute path"),
    (["m/a//b", "m/a/b"], "refused object s3://b/m/a/b: the same path as s3://b/m/a//b"),
    (["m/a", "m/a/b"], "refused object s3://b/m/a: it is also a directory (s3://b/m/a/b)"),
    (["m/.shipyard-fetch.json"], "name reserved by fetch"),
])
def test_build_relative_paths(keys: list[str], expected: Any) -> None:
    try:
        got: Any = s3.build_relative_paths(keys, "m/", "s3://b/m/")
    except FetchError as error:
        got = str(error)
    assert got == expected or (isinstance(expected, str) and expected in got)


@pytest.mark.parametrize(("env", "flag", "expected"), [
    ({}, None, {"endpoint": None, "region": None, "addressing": "auto"}),
    ({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}, None,
     {"endpoint": "http://127.0.0.1:9000", "region": "eu-west-1", "addressing": "path"}),
    ({"AWS_ENDPOINT_URL": "https://minio:9000", "AWS_DEFAULT_REGION": "us-east-2"}, "virtual",
     {"endpoint": "https://minio:9000", "region": "us-east-2", "addressing": "virtual"}),
    ({"AWS_ENDPOINT_URL_S3": "https://a", "AWS_ENDPOINT_URL": "https://b"}, "AUTO",
     {"endpoint": "https://a", "region": None, "addressing": "auto"}),
    ({}, "dns", "S3 addressing 'dns': expected one of auto, path, virtual"),
])
def test_client_settings(env: dict[str, str], flag: str | None, expected: Any) -> None:
    try:
        got: Any = s3.build_client_settings(env, flag)
    except UsageError as error:
        got = str(error)
    assert got == expected or (isinstance(expected, str) and expected in got)


def test_validator() -> None:
    a = plan.build_validator([("k", 1, '"e1"', None)])
    assert a and a == plan.build_validator([("k", 1, '"e1"', None)])
    assert a != plan.build_validator([("k", 1, '"e2"', None)])
    assert plan.build_validator([("k", 1, None, None)]) is None
    assert plan.build_validator([("k", None, None, "Tue, 01 Dec 2026 00:00:00 GMT")])


# -- flags, environment, summary ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("1073741824", 1 << 30), ("64Gi", 64 << 30), ("16Mi", 16 << 20), ("500M", 500_000_000), ("2k", 2000),
    ("1.5Gi", "is not a size"), ("-1", "is not a size"), ("10X", "is not a size"),
])
def test_parse_size(text: str, expected: Any) -> None:
    try:
        got: Any = command.parse_size(text, "--x")
    except UsageError as error:
        got = str(error)
    assert got == expected or (isinstance(expected, str) and expected in got)


@pytest.mark.parametrize(("argv", "env", "check"), [
    (["--uri", "s3://models/m/", "--dest", "/mnt/models"], {},
     {"uri": "s3://models/m/", "dest": "/mnt/models", "timeout": 30.0, "retries": 5, "parallelism": 8,
      "max_extracted_bytes": 64 << 30, "deadline": 3600.0, "cache": None, "digest": None}),
    ([], {"SHIPYARD_FETCH_URI": "https://h/m.zip", "SHIPYARD_FETCH_DEST": "/d", "SHIPYARD_FETCH_TIMEOUT": "5",
          "SHIPYARD_FETCH_MAX_EXTRACTED_BYTES": "1Gi", "SHIPYARD_FETCH_DIGEST": f"SHA256:{HEX.upper()}",
          "SHIPYARD_FETCH_CACHE": "/var/cache/shipyard", "SHIPYARD_FETCH_CA_BUNDLE": "/etc/ca.pem",
          "SHIPYARD_FETCH_PARALLELISM": "16", "SHIPYARD_FETCH_S3_ADDRESSING": "virtual",
          "SHIPYARD_TERMINATION_LOG": "/tmp/term"},
     {"uri": "https://h/m.zip", "timeout": 5.0, "max_extracted_bytes": 1 << 30, "digest": f"sha256:{HEX}",
      "cache": "/var/cache/shipyard", "ca_bundle": "/etc/ca.pem", "parallelism": 16, "s3_addressing": "virtual",
      "termination_log": "/tmp/term"}),
    (["--uri", "s3://models/a", "--dest", "/d", "--retries", "0"],
     {"SHIPYARD_FETCH_URI": "s3://models/b", "SHIPYARD_FETCH_RETRIES": "9"}, {"uri": "s3://models/a", "retries": 0}),
    (["--uri", "http://127.0.0.1/m", "--dest", "/d"], {"SHIPYARD_FETCH_ALLOW_HTTP": "true"}, {"allow_http": True}),
    (["--uri", "http://127.0.0.1/m", "--dest", "/d", "--allow-http"], {}, {"allow_http": True}),
    (["--dest", "/d"], {}, "--uri (SHIPYARD_FETCH_URI) is required"),
    (["--uri", "s3://models/m"], {}, "--dest (SHIPYARD_FETCH_DEST) is required"),
    (["--uri", "s3://models/m", "--dest", "/d"], {"SHIPYARD_FETCH_TIMEOUT": "soon"},
     "--timeout (SHIPYARD_FETCH_TIMEOUT): 'soon' is not a number"),
    (["--uri", "s3://models/m", "--dest", "/d", "--parallelism", "0"], {},
     "--parallelism (SHIPYARD_FETCH_PARALLELISM): 0 is out of range [1, 64]"),
    (["--uri", "s3://models/m", "--dest", "/d", "--digest", "sha256:12"], {},
     "--digest (SHIPYARD_FETCH_DIGEST): digest 'sha256:12' is not sha256:<64 hex digits>"),
    (["--uri", "s3://models/m", "--dest", "/d", "--part-size", "1k"], {},
     "--part-size (SHIPYARD_FETCH_PART_SIZE): at least 1048576 bytes"),
    (["--uri", "http://h/m", "--dest", "/d"], {}, "plain http is refused"),
    (["--uri", "s3://models/m", "--dest", "/d"], {"SHIPYARD_FETCH_ALLOW_HTTP": "maybe"}, "is not a boolean"),
    (["--uri", "s3://models/m", "--dest", "/d", "--secret-key", "x"], {}, "invalid command line"),
])
def test_build_config(argv: list[str], env: dict[str, str], check: Any) -> None:
    try:
        config = command.build_config(argv, env)
    except UsageError as error:
        assert isinstance(check, str) and check in str(error)
        return
    assert isinstance(check, dict)
    assert {k: getattr(config, k) for k in check} == check


@pytest.mark.parametrize(("uri", "extract", "kinds"), [
    ("s3://models/m/", True, (True,)),
    ("s3://models/m.tar.gz", True, (True,)),
    ("s3://models/m.tar.gz", False, (False, True)),
    ("s3://models/m", True, (False, True)),
    ("https://h/m.zip", True, (True,)),
    ("https://h/m.bin", True, (False,)),
])
def test_lookup_kinds(uri: str, extract: bool, kinds: tuple[bool, ...]) -> None:
    assert command.build_lookup_kinds(sources.parse_uri(uri), extract) == kinds


def test_summary_line_and_its_fields() -> None:
    outcome = command.Outcome("s3://models/m/", "/mnt/models", f"sha256:{HEX}", 3, 1 << 30, 1 << 30, 12.345, False)
    line = command.build_summary_line(outcome)
    assert line.startswith("Fetched s3://models/m/ into /mnt/models: 3 files, 1.00 GiB in 12.3 s (87.0 MB/s), "
                           f"digest sha256:{HEX}, cache miss [")
    assert contract.parse_fetch_summary_fields(line) == {
        "bytes": 1 << 30, "files": 3, "seconds": 12.345, "downloadedBytes": 1 << 30, "digest": f"sha256:{HEX}",
        "cacheHit": False}
    hit = command.build_summary_line(command.Outcome("https://h/m.zip", "/d", f"sha256:{HEX}", 1, 10, 0, 0.2, True))
    assert "from the cache" in hit and contract.parse_fetch_summary_fields(hit)["cacheHit"] is True
    long = command.build_summary_line(command.Outcome("s3://b/" + "k" * 5000, "/d", f"sha256:{HEX}", 1, 1, 1, 1, False))
    assert len(long) <= command.LINE_LIMIT and long.endswith("cacheHit=false]")
    assert contract.parse_fetch_summary_fields("x [cacheHit=yes bytes=oops files=2]") == {"files": 2}


def test_failure_line() -> None:
    assert command.build_failure_line("s3://b/k", "access denied (403) to s3://b/k\nmore") == \
        "Fetch of s3://b/k failed: access denied (403) to s3://b/k more"
    assert len(command.build_failure_line("x", "y" * 9000)) == command.LINE_LIMIT


@pytest.mark.parametrize(("done", "total", "window", "seconds", "line"), [
    (512 << 20, 1 << 30, 170_600_000, 2.0, "Fetching s3://b/k: 512.0 MiB / 1.00 GiB (50%), 85.3 MB/s"),
    (3000, None, 3000, 2.0, "Fetching s3://b/k: 2.9 KiB, 0.0 MB/s"),
])
def test_progress_line(done: int, total: int | None, window: int, seconds: float, line: str) -> None:
    assert progress.build_progress_line("s3://b/k", done, total, window, seconds) == line


def test_usage_error_goes_to_the_termination_log(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(contract.ENV_TERMINATION_LOG, str(tmp_path / "term"))
    assert cli.main(["fetch", "--uri", "https://u:hunter2@h/m.bin", "--dest", str(tmp_path / "d")]) == 2
    line = (tmp_path / "term").read_text().strip()
    assert line == capsys.readouterr().out.strip()
    assert line.startswith("Fetch of the model failed: credentials in the URI are refused") and "hunter2" not in line


def test_fetch_is_a_subcommand_that_imports_no_boto3_or_torch_before_it_runs() -> None:
    assert cli.SUBCOMMANDS[contract.FETCH_SUBCOMMAND][0] == "shipyard.runtime.fetch"
    code = ("import sys; from shipyard.runtime import cli; from shipyard.runtime.fetch import command; "
            "print(sorted(m for m in ('boto3', 'botocore', 'torch') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("contract", "runtime"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


# -- destinations, staging, cache ---------------------------------------------------------------------------------

def _record(dest: Path, digest: str) -> None:
    (dest / staging.RECORD).write_text(json.dumps({"digest": digest}))


def test_destination_states(tmp_path: Path) -> None:
    absent = staging.Destination(tmp_path / "new" / "model")
    assert absent.prepare(None) is False and not absent.inplace

    empty = tmp_path / "mount"
    empty.mkdir()
    dest = staging.Destination(empty)
    assert dest.prepare(None) is False and dest.inplace and not dest.replace

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not empty and was not written by fetch"):
        staging.Destination(foreign).prepare(None)
    assert (foreign / "notes.txt").exists()

    written = tmp_path / "written"
    written.mkdir()
    (written / "model.bin").write_bytes(b"weights")
    _record(written, "x")
    digest = digests.compute_digest(written)
    assert staging.Destination(written).prepare(digest) is True
    again = staging.Destination(written)
    assert again.prepare(f"sha256:{HEX}") is False and again.replace

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "half.bin").write_bytes(b"x")
    (interrupted / staging.MARKER).touch()
    assert staging.Destination(interrupted).prepare(None) is False
    assert sorted(p.name for p in interrupted.iterdir()) == []

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        staging.Destination(a_file).prepare(None)


@pytest.mark.parametrize("inplace", [False, True])
def test_commit_moves_the_content_in_whole(tmp_path: Path, inplace: bool) -> None:
    path = tmp_path / "dest"
    if inplace:
        path.mkdir()
    dest = staging.Destination(path)
    dest.prepare(None)
    with dest.new_staging() as stage:
        (stage.model / "sub").mkdir()
        (stage.model / "sub" / "w.bin").write_bytes(b"w")
        assert not (path / "sub").exists()
        dest.commit(stage, {"digest": "d"})
    assert (path / "sub" / "w.bin").read_bytes() == b"w"
    assert json.loads((path / staging.RECORD).read_text()) == {"digest": "d"}
    assert sorted(p.name for p in path.iterdir()) == [staging.RECORD, "sub"]
    assert [p for p in tmp_path.iterdir() if p.name != "dest"] == []


def test_sweep_removes_only_unlocked_staging(tmp_path: Path) -> None:
    live = staging.Staging(tmp_path, "s-")
    dead = tmp_path / "s-dead"
    dead.mkdir()
    (dead / staging.LOCK).touch()
    (dead / "model").mkdir()
    staging.sweep(tmp_path, "s-")
    assert live.root.exists() and not dead.exists()
    live.close()
    assert not live.root.exists()


def test_held_lock_waits_for_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / "k.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    threading.Timer(0.3, os.close, [fd]).start()
    deadline = retry.Deadline(10)
    with staging.held_lock(lock, "k", deadline):
        assert deadline.remaining() < 9.8
    with pytest.raises(FetchError, match="deadline of 0.2 s exceeded"):
        fd2 = os.open(lock, os.O_RDWR)
        fcntl.flock(fd2, fcntl.LOCK_EX)
        try:
            with staging.held_lock(lock, "k", retry.Deadline(0.2)):
                pass
        finally:
            os.close(fd2)


def test_cache_insert_lookup_and_corruption(tmp_path: Path) -> None:
    store = cache.Cache(tmp_path / "cache", retry.Deadline(60))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.bin").write_bytes(b"a" * 100)
    digest = digests.compute_digest(tree)
    with store.lock(cache.build_digest_key(digest)):
        entry = store.insert(tree, digest, True)
        assert stat.S_IMODE((entry / "a.bin").stat().st_mode) == 0o444
        assert store.lookup(digest, (False, True)) == (True, entry)
    model = tmp_path / "model"
    model.mkdir()
    files, size, how = cache.populate(entry, True, model, "unused")
    assert (files, size, how) == (1, 100, "hard links")
    assert (model / "a.bin").stat().st_ino == (entry / "a.bin").stat().st_ino
    os.chmod(entry / "a.bin", 0o644)
    (entry / "a.bin").write_bytes(b"tampered")
    assert store.lookup(digest, (True,)) is None and not entry.exists()
    key = cache.build_index_key("http://127.0.0.1:9000", "s3://b/k", "v1")
    assert key.startswith("src-") and key != cache.build_index_key("", "s3://b/k", "v1")
    store.index_put(key, digest)
    assert store.index_get(key) == digest and store.index_get("src-none") is None
