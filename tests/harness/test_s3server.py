"""The stack's S3-compatible server (hack/s3.py: versitygw's posix backend on 127.0.0.1, tests/s3server.py) does what a
model fetcher's tests rely on: a multipart upload, whole, ranged and presigned downloads with the right bytes, the
errors AWS gives (a wrong secret, an unknown key, no signature, a missing object) with no secret in them, and an
access log from which `downloads` counts the GET requests of one object; `stop` leaves no process behind.

Each test here but the last uses a server of this module's own (the last checks the suite's `s3_server` fixture),
so the counts start from zero. ``hack/build-binaries.sh`` builds versitygw by default (about a minute on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import stack
from tests.s3server import S3Server, s3_mod, start_s3

pytestmark = [pytest.mark.harness, pytest.mark.timeout(300)]

MiB = 1024 * 1024
SIZE = 20 * MiB
PART = 5 * MiB
BUCKET = "models"
KEY = "digits/v1/model.bin"


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shipyard-s3-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def server(base: Path) -> Iterator[S3Server]:
    server = start_s3(base / "s3")  # RuntimeError when versitygw is not built: it names hack/build-binaries.sh
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def payload(base: Path) -> Path:
    path = base / "model.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture(scope="module")
def uploaded(server: S3Server, payload: Path) -> bytes:
    """The 20 MiB object, uploaded in 5 MiB parts (boto3's managed transfer, multipart above 5 MiB)."""
    from boto3.s3.transfer import TransferConfig

    server.make_bucket(BUCKET)
    server.client().upload_file(str(payload), BUCKET, KEY,
                                Config=TransferConfig(multipart_threshold=PART, multipart_chunksize=PART))
    return payload.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def error_of(call: Any) -> tuple[int, str, str]:
    """(HTTP status, S3 error code, the response body's text) of a boto3 call that must fail."""
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as raised:
        call()
    response = raised.value.response
    return int(response["ResponseMetadata"]["HTTPStatusCode"]), str(response["Error"]["Code"]), json.dumps(response)


def test_multipart_upload_lands_as_one_object(server: S3Server, uploaded: bytes) -> None:
    head = server.client().head_object(Bucket=BUCKET, Key=KEY)
    assert head["ContentLength"] == SIZE
    assert head["ETag"].strip('"').endswith("-4"), head["ETag"]  # a multipart ETag: md5 of the parts' md5s, "-N"
    ops = [r["operation"] for r in server.requests() if r["key"] == KEY]
    assert ops.count("s3_CreateMultipartUpload") == 1
    assert ops.count("s3_UploadPart") == SIZE // PART
    assert ops.count("s3_CompleteMultipartUpload") == 1
    # the posix backend: the bucket is a directory, the object a plain file
    assert sha((server.state_dir / "data" / BUCKET / KEY).read_bytes()) == sha(uploaded)


def test_whole_ranged_and_presigned_downloads(server: S3Server, uploaded: bytes) -> None:
    client = server.client()
    assert server.downloads(BUCKET, KEY) == 0

    whole = client.get_object(Bucket=BUCKET, Key=KEY)
    assert sha(whole["Body"].read()) == sha(uploaded)

    start, end = 7 * MiB + 3, 9 * MiB + 11  # across the boundary of parts 2 and 3
    ranged = client.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={start}-{end}")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert ranged["ContentRange"] == f"bytes {start}-{end}/{SIZE}"
    assert ranged["Body"].read() == uploaded[start:end + 1]

    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": KEY}, ExpiresIn=300)
    with urllib.request.urlopen(url, timeout=30) as response:  # no SDK: the URL alone authenticates
        assert response.status == 200
        assert sha(response.read()) == sha(uploaded)
    tail = urllib.request.Request(url, headers={"Range": f"bytes={SIZE - 100}-"})
    with urllib.request.urlopen(tail, timeout=30) as response:
        assert response.status == 206
        assert response.read() == uploaded[-100:]

    assert server.downloads(BUCKET, KEY) == 4
    gets = [r for r in server.requests() if r["operation"] == "s3_GetObject" and r["key"] == KEY]
    assert [(r["bucket"], r["status"], r["error_code"]) for r in gets] == [(BUCKET, 200, None)] * 4
    # the presigned ones are signed with the root key too, and say who fetched them
    assert [r["requester"] for r in gets] == [server.access_key] * 4
    assert [r["user_agent"].startswith("Python-urllib/") for r in gets] == [False, False, True, True]


def test_a_download_in_ranged_parts_counts_each_get(server: S3Server, uploaded: bytes, base: Path) -> None:
    """boto3's download_file fetches an object above its threshold in ranged parts: `downloads` counts GETs."""
    from boto3.s3.transfer import TransferConfig

    before = server.downloads(BUCKET, KEY)
    target = base / "downloaded.bin"
    server.client().download_file(BUCKET, KEY, str(target),
                                  Config=TransferConfig(multipart_threshold=PART, multipart_chunksize=PART))
    assert sha(target.read_bytes()) == sha(uploaded)
    assert server.downloads(BUCKET, KEY) - before == SIZE // PART


def test_wrong_credentials_are_refused_without_naming_a_secret(server: S3Server, uploaded: bytes) -> None:
    before = server.downloads(BUCKET, KEY)
    wrong_secret = "W" * 40
    status, code, body = error_of(lambda: server.client(secret_key=wrong_secret).get_object(Bucket=BUCKET, Key=KEY))
    assert (status, code) == (403, "SignatureDoesNotMatch")  # as AWS answers a known key with a wrong secret
    assert server.secret_key not in body and wrong_secret not in body

    unknown = server.client(access_key="SYUNKNOWNUNKNOWN0000")
    status, code, body = error_of(lambda: unknown.get_object(Bucket=BUCKET, Key=KEY))
    assert (status, code) == (403, "InvalidAccessKeyId")
    assert server.secret_key not in body

    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{server.endpoint}/{BUCKET}/{KEY}", timeout=30)
    assert anonymous.value.code == 403
    assert b"<Code>AccessDenied</Code>" in anonymous.value.read()

    assert server.downloads(BUCKET, KEY) == before  # refused GETs are logged, not counted
    refused = [(r["status"], r["error_code"]) for r in server.requests()
               if r["operation"] == "s3_GetObject" and r["status"] == 403]
    assert refused == [(403, "SignatureDoesNotMatch"), (403, "InvalidAccessKeyId"), (403, "AccessDenied")]
    for log in (server.access_log, server.state_dir / "versitygw.log"):
        assert server.secret_key not in log.read_text(), f"{log} holds the secret"


def test_a_missing_key_is_404_no_such_key(server: S3Server, uploaded: bytes) -> None:
    status, code, _ = error_of(lambda: server.client().get_object(Bucket=BUCKET, Key="digits/v2/model.bin"))
    assert (status, code) == (404, "NoSuchKey")
    [logged] = [r for r in server.requests() if r["key"] == "digits/v2/model.bin"]
    assert (logged["operation"], logged["status"], logged["error_code"]) == ("s3_GetObject", 404, "NoSuchKey")
    assert server.downloads(BUCKET, "digits/v2/model.bin") == 0


def test_stop_leaves_no_process_and_a_restart_keeps_data_and_keys(server: S3Server, uploaded: bytes) -> None:
    port = int(server.endpoint.rsplit(":", 1)[1])
    server.stop()
    assert not stack.proc.alive(server.pid)
    assert s3_mod.status(server.state_dir) is None
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the port still answers"

    again = start_s3(server.state_dir)  # stopped by the module fixture at the end (a no-op when already stopped)
    server.pid, server.endpoint = again.pid, again.endpoint
    assert (again.access_key, again.secret_key) == (server.access_key, server.secret_key)
    assert oct((server.state_dir / "credentials.json").stat().st_mode & 0o777) == "0o600"
    assert sha(again.client().get_object(Bucket=BUCKET, Key=KEY)["Body"].read()) == sha(uploaded)


def test_the_suite_fixture_serves(s3_server: S3Server) -> None:
    s3_server.make_bucket("harness-fixture")
    s3_server.put_object("harness-fixture", "a/b.txt", b"hello")
    before = s3_server.downloads("harness-fixture", "a/b.txt")
    assert s3_server.client().get_object(Bucket="harness-fixture", Key="a/b.txt")["Body"].read() == b"hello"
    assert s3_server.downloads("harness-fixture", "a/b.txt") == before + 1
