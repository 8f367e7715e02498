"""hack/s3.py's pure parts: versitygw's command line and environment (bound to 127.0.0.1, no secret on the command
line, no inherited variable that versitygw reads as a flag), the generated keys, and the access-log parser on lines
versitygw v1.8.0 wrote (a key with spaces, a presigned GET, refused and missing ones)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.modules import load_file

S3 = load_file("shipyard_hack_s3_unit", Path(__file__).parents[2] / "hack" / "s3.py")

UA = ("Boto3/1.44.8 md/Botocore#1.44.8 ua/2.1 os/linux#6.18.44-fc-v1098 md/arch#x86_64 lang/python#3.11.7 "
      "md/pyimpl#CPython m/b,E,e,Z,N cfg/retry-mode#standard Botocore/1.44.8")
HOST_ID = "4RsHvxshNkdU0tHidw4ZnhsDig3XmAw/IiRnTz3hj0T39FO4PlwJrRtQ5gEsVlGKu+4G/SEThxvKlm8gHHWAiQ4="
TAIL = f"- {HOST_ID} SigV4 - AuthHeader s3.us-east-1.amazonaws.com -"
AK = "SYNVBY5DRB79W69S3LD2"
T = "[03/December/2026:00:45:14 +0000]"
GET = (f"{AK} models {T} 127.0.0.1 {AK} S8FBAZ934EGGVSXB s3_GetObject a/b.bin /models/a/b.bin 200 - 0 0 0 0 - "
       f"{UA} {TAIL} arn:aws:s3:::/models/a/b.bin Yes")
SPACES = (f"{AK} models {T} 127.0.0.1 {AK} QTR8Y4S6ZAB5Y453 s3_PutObject sp ace+plus%.bin "
          f"/models/sp%20ace%2Bplus%25.bin 200 - 0 10 0 0 - {UA} {TAIL} arn:aws:s3:::/models/sp ace+plus%.bin Yes")
PRESIGNED = (f"{AK} models {T} 127.0.0.1 {AK} 2GR76HEG4PE4KOOV s3_GetObject a/b.bin /models/a/b.bin?X-Amz-Algorithm="
             f"AWS4-HMAC-SHA256&X-Amz-Credential={AK}%2F20261203%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261203T"
             "004514Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=1be636a3 200 - 0 0 0 0 - "
             f"Python-urllib/3.11 {TAIL} arn:aws:s3:::/models/a/b.bin Yes")
ANONYMOUS = (f"- models {T} 127.0.0.1 - 63RFUKI9H5BEKD3U s3_GetObject a/b.bin /models/a/b.bin 403 AccessDenied 0 0 0 0 "
             f"- Python-urllib/3.11 {TAIL} arn:aws:s3:::/models/a/b.bin Yes")
MISSING = (f"{AK} models {T} 127.0.0.1 {AK} BC11IQU1LQKQL1Z9 s3_GetObject nope /models/nope 404 NoSuchKey 0 0 0 0 - "
           f"{UA} {TAIL} arn:aws:s3:::/models/nope Yes")
LIST = (f"{AK} models {T} 127.0.0.1 {AK} 3J7NSAJCK0PVHAPW s3_ListObjectsV2 - /models?list-type=2&encoding-type=url "
        f"200 - 779 0 0 0 - {UA} {TAIL} arn:aws:s3:::/models Yes")
STARTS = "log starts 2026-12-03 00:45:06.916011852 +0000 UTC m=+0.021713406"


def test_a_get_line() -> None:
    assert S3.parse_access_log_line(GET) == {
        "bucket_owner": AK, "bucket": "models", "time": "03/December/2026:00:45:14 +0000", "remote_ip": "127.0.0.1",
        "requester": AK, "request_id": "S8FBAZ934EGGVSXB", "operation": "s3_GetObject", "key": "a/b.bin",
        "request_uri": "/models/a/b.bin", "status": 200, "error_code": None, "bytes_sent": 0, "object_size": 0,
        "total_time_ms": 0, "turnaround_time_ms": 0, "referer": None, "user_agent": UA,
    }


@pytest.mark.parametrize(("line", "expected"), [
    (SPACES, ("s3_PutObject", "sp ace+plus%.bin", 200, None, 10, "Boto3/")),
    (PRESIGNED, ("s3_GetObject", "a/b.bin", 200, None, 0, "Python-urllib/3.11")),
    (ANONYMOUS, ("s3_GetObject", "a/b.bin", 403, "AccessDenied", 0, "Python-urllib/3.11")),
    (MISSING, ("s3_GetObject", "nope", 404, "NoSuchKey", 0, "Boto3/")),
    (LIST, ("s3_ListObjectsV2", None, 200, None, 0, "Boto3/")),
], ids=["key-with-spaces", "presigned", "anonymous", "missing", "bucket-request"])
def test_lines(line: str, expected: tuple[object, ...]) -> None:
    r = S3.parse_access_log_line(line)
    assert (r["operation"], r["key"], r["status"], r["error_code"], r["object_size"]) == expected[:5]
    assert r["user_agent"].startswith(expected[5])


def test_anonymous_and_presigned_requesters() -> None:
    assert S3.parse_access_log_line(ANONYMOUS)["requester"] is None
    assert S3.parse_access_log_line(ANONYMOUS)["bucket_owner"] is None
    assert S3.parse_access_log_line(PRESIGNED)["requester"] == AK
    assert S3.parse_access_log_line(PRESIGNED)["request_uri"].startswith("/models/a/b.bin?X-Amz-Algorithm=")


def test_a_log_skips_its_banner_and_a_line_being_written() -> None:
    text = "\n".join([STARTS, GET, STARTS, MISSING]) + "\n" + GET[:40]
    assert [r["request_id"] for r in S3.parse_access_log(text)] == ["S8FBAZ934EGGVSXB", "BC11IQU1LQKQL1Z9"]
    assert S3.parse_access_log("") == []


def test_a_line_of_another_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a versitygw access-log line"):
        S3.parse_access_log("GET /models/a/b.bin 200\n")


def test_argv_binds_loopback_and_holds_no_secret(tmp_path: Path) -> None:
    argv = S3.build_argv(Path("/bin/versitygw"), 7070, tmp_path)
    assert argv[argv.index("--port") + 1] == "127.0.0.1:7070"
    assert argv[argv.index("--access-log") + 1] == str(tmp_path / "access.log")
    assert argv[argv.index("--iam-dir") + 1] == str(tmp_path / "iam")
    assert argv[-4:] == ["posix", "--sidecar", str(tmp_path / "meta"), str(tmp_path / "data")]
    assert not {"--access", "--secret", "-a", "-s"} & set(argv)


def test_env_drops_what_versitygw_reads_as_flags() -> None:
    base = {"PATH": "/usr/bin", "HOME": "/root", "VGW_PORT": ":9000", "LOGFILE": "/x", "WEBHOOK": "http://x",
            "ROOT_ACCESS_KEY": "old", "AWS_SECRET_ACCESS_KEY": "s", "ADMIN_ACCESS_KEY": "a", "AZ_ENDPOINT": "z"}
    assert S3.child_env(base, "AK", "SK") == {"PATH": "/usr/bin", "HOME": "/root", "ROOT_ACCESS_KEY_ID": "AK",
                                              "ROOT_SECRET_ACCESS_KEY": "SK"}


def test_credentials_are_random_private_and_reused(tmp_path: Path) -> None:
    one, two = S3.generate_credentials(), S3.generate_credentials()
    assert one != two
    assert len(one["accessKey"]) == 20 and one["accessKey"].isalnum() and one["accessKey"].isupper()
    assert len(one["secretKey"]) == 40 and one["secretKey"].isalnum()
    path = tmp_path / "credentials.json"
    created = S3.load_or_create_credentials(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert S3.load_or_create_credentials(path) == created == json.loads(path.read_text())
