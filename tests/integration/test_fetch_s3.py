"""`shipyard-runtime fetch` from a real S3-compatible server (the stack's versitygw, tests/s3server.py), run as the
init container runs it: a process of its own configured by the environment (AWS_* as a Secret would give them,
SHIPYARD_FETCH_*), its exit code, stdout line and termination message.

One object, a prefix (with and without its trailing `/`), a 200 MiB object in parallel ranged GETs (counted in the
server's access log), a wrong secret and a missing key named without the secret, the server killed mid-download and
restarted (retried, never a partial model), and a cache shared by four fetches (one download, counted by the
server). The suite's `s3_server` is shared: every test uses a bucket of its own.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from shipyard import contract
from shipyard.runtime.fetch import digests
from tests.integration.test_fetch_https import Run, run_fetch  # one way to run fetch as a process

if TYPE_CHECKING:
    from tests.s3server import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
PART = 16 * MiB  # fetch's default --part-size


def fetch_env(server: S3Server, tmp_path: Path, **extra: str) -> dict[str, str]:
    """What a pod gets: the server's keys, region and endpoint as AWS_* variables (from a Secret), and nothing of
    this machine's AWS settings (no config files, no instance metadata)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHIPYARD_"))}
    env.update(server.env())
    env.update({"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
                "NO_PROXY": "127.0.0.1,localhost", "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in
                                                                                  ("contract", "runtime")),
                contract.ENV_TERMINATION_LOG: str(tmp_path / f"termination-{secrets.token_hex(4)}")})
    env.update(extra)
    return env


def fetch(env: dict[str, str], *args: str, timeout: float = 300) -> Run:
    return run_fetch(env, *args, timeout=timeout)


def bucket(server: S3Server) -> str:
    name = f"fetch-{secrets.token_hex(5)}"
    server.make_bucket(name)
    return name


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "model.safetensors"
    with open(path, "wb") as handle:
        for _ in range(200):
            handle.write(os.urandom(MiB))
    return path


def test_one_object(s3_server: S3Server, tmp_path: Path) -> None:
    name = bucket(s3_server)
    data = os.urandom(3 * MiB + 17)
    s3_server.put_object(name, "digits/v1/model.safetensors", data)
    env = fetch_env(s3_server, tmp_path, SHIPYARD_FETCH_URI=f"s3://{name}/digits/v1/model.safetensors",
                    SHIPYARD_FETCH_DEST=str(tmp_path / "m"), SHIPYARD_FETCH_DIGEST=sha(data))
    run = fetch(env)
    assert run.code == 0, run.log
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == data
    assert run.termination == run.line
    fields = contract.parse_fetch_summary_fields(run.line)
    assert (fields["bytes"], fields["files"], fields["digest"], fields["cacheHit"]) == (len(data), 1, sha(data), False)
    assert s3_server.downloads(name, "digits/v1/model.safetensors") == 1
    assert f"S3: endpoint {s3_server.endpoint}, region {s3_server.region}, path addressing, credentials from env" \
        in run.log


@pytest.mark.parametrize("uri_suffix", ["digits/v1/", "digits/v1"])
def test_a_prefix_is_a_directory_model(s3_server: S3Server, tmp_path: Path, uri_suffix: str) -> None:
    name = bucket(s3_server)
    local = tmp_path / "local"
    files = {"shipyard-model.json": b'{"format": 1}', "model.safetensors": os.urandom(MiB),
             "tokenizer/tokenizer.json": b'{"v": 1}', "tokenizer/special tokens.txt": b"[CLS]"}
    for rel, data in files.items():
        s3_server.put_object(name, f"digits/v1/{rel}", data)
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    s3_server.put_object(name, "digits/v10/other.bin", b"not this model")  # a sibling prefix: never mixed in
    s3_server.put_object(name, "digits/v1/", b"")  # a folder marker, as consoles create them
    env = fetch_env(s3_server, tmp_path)
    run = fetch(env, "--uri", f"s3://{name}/{uri_suffix}", "--dest", str(tmp_path / "m"))
    assert run.code == 0, run.log
    for rel, data in files.items():
        assert (tmp_path / "m" / rel).read_bytes() == data
    assert not (tmp_path / "m" / "other.bin").exists()
    assert contract.parse_fetch_summary_fields(run.line)["digest"] == digests.compute_digest(local)
    assert digests.compute_digest(tmp_path / "m") == digests.compute_digest(local)


def test_200_mib_in_parallel_ranged_gets(s3_server: S3Server, tmp_path: Path, big: Path) -> None:
    name = bucket(s3_server)
    s3_server.put_object(name, "llm/model.safetensors", big)
    digest = digests.compute_digest(big)
    run = fetch(fetch_env(s3_server, tmp_path), "--uri", f"s3://{name}/llm/model.safetensors", "--dest",
                str(tmp_path / "m"), "--digest", digest, "--parallelism", "8")
    assert run.code == 0, run.log
    assert digests.compute_digest(tmp_path / "m" / "model.safetensors") == digest
    parts = -(-big.stat().st_size // PART)
    assert s3_server.downloads(name, "llm/model.safetensors") == parts == 13
    ranges = [r for r in s3_server.requests() if r["operation"] == "s3_GetObject" and r["bucket"] == name]
    assert len(ranges) == parts
    print(f"\n200 MiB in {parts} ranged GETs: {run.line}")


def test_a_wrong_secret_is_access_denied_and_never_shown(s3_server: S3Server, tmp_path: Path) -> None:
    name = bucket(s3_server)
    s3_server.put_object(name, "m/model.bin", b"weights")
    wrong = "Wr0ngSecret" + secrets.token_hex(12)
    env = fetch_env(s3_server, tmp_path, AWS_SECRET_ACCESS_KEY=wrong)
    run = fetch(env, "--uri", f"s3://{name}/m/model.bin", "--dest", str(tmp_path / "m"))
    assert run.code == 1
    assert run.line == f"Fetch of s3://{name}/m/model.bin failed: access denied (403) to s3://{name}/m/model.bin: " \
                       "SignatureDoesNotMatch"
    for text in (run.line, run.log, run.termination):
        assert wrong not in text and s3_server.secret_key not in text
    assert "Attempt" not in run.log, "a 403 is not retried"
    assert not (tmp_path / "m").exists()


def test_a_cached_model_is_refused_to_a_wrong_secret(s3_server: S3Server, tmp_path: Path) -> None:
    """The node cache is shared by the node's pods: a hit still asks the source (one HEAD, no GET), so a pod whose
    credentials the store refuses gets no model, whatever digest it names."""
    name = bucket(s3_server)
    data = b"weights of another tenant"
    s3_server.put_object(name, "m/model.bin", data)
    cache = str(tmp_path / "cache")
    first = fetch(fetch_env(s3_server, tmp_path), "--uri", f"s3://{name}/m/model.bin", "--dest",
                  str(tmp_path / "a"), "--cache", cache, "--digest", sha(data))
    assert first.code == 0, first.log
    wrong = "Wr0ngSecret" + secrets.token_hex(12)
    run = fetch(fetch_env(s3_server, tmp_path, AWS_SECRET_ACCESS_KEY=wrong), "--uri", f"s3://{name}/m/model.bin",
                "--dest", str(tmp_path / "b"), "--cache", cache, "--digest", sha(data))
    assert run.code == 1 and "access denied (403)" in run.line, run.log
    assert not (tmp_path / "b").exists() and s3_server.downloads(name, "m/model.bin") == 1


@pytest.mark.parametrize(("uri", "message"), [
    ("s3://{b}/missing/model.bin", "not found (404): s3://{b}/missing/model.bin (no such object, and no objects "
                                   "under s3://{b}/missing/model.bin/)"),
    ("s3://{b}/missing/", "not found (404): s3://{b}/missing/ (no objects under the prefix)"),
    ("s3://nosuchbucket-{b}/m.bin", "not found (404): s3://nosuchbucket-{b} (no such bucket)"),
])
def test_missing_objects_are_named(s3_server: S3Server, tmp_path: Path, uri: str, message: str) -> None:
    name = bucket(s3_server)
    run = fetch(fetch_env(s3_server, tmp_path), "--uri", uri.format(b=name), "--dest", str(tmp_path / "m"))
    assert run.code == 1
    assert run.line == f"Fetch of {uri.format(b=name)} failed: {message.format(b=name)}"
    assert not (tmp_path / "m").exists()


def _gets(server: S3Server, name: str, key: str) -> int:
    return sum(1 for r in server.requests() if r["operation"] == "s3_GetObject" and r["bucket"] == name
               and r["key"] == key)


def test_the_server_killed_mid_download_and_restarted(tmp_path: Path, big: Path) -> None:
    from tests.s3server import start_s3

    state = tmp_path / "s3"
    server = start_s3(state)
    port = int(server.endpoint.rsplit(":", 1)[1])
    try:
        name = bucket(server)
        server.put_object(name, "m/model.safetensors", big)
        digest = digests.compute_digest(big)
        dest = tmp_path / "m"
        env = fetch_env(server, tmp_path)
        # one part of 1 MiB at a time: 200 GETs in a row, so that the kill lands mid-download
        proc = subprocess.Popen([sys.executable, "-m", "shipyard.runtime.cli", "fetch", "--uri",
                                 f"s3://{name}/m/model.safetensors", "--dest", str(dest), "--digest", digest,
                                 "--parallelism", "1", "--part-size", "1Mi", "--timeout", "5"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while _gets(server, name, "m/model.safetensors") < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.stop()
        killed_after = _gets(server, name, "m/model.safetensors")
        assert proc.poll() is None, "the fetch ended before the server was killed"
        assert not dest.exists(), "a partial model at --dest"
        time.sleep(1.5)
        assert not dest.exists()
        server = start_s3(state, port)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert digests.compute_digest(dest / "model.safetensors") == digest
        assert 5 <= killed_after < 200
        assert "failed: could not connect to" in err or "failed: connection" in err
        print(f"\nkilled after {killed_after} of 200 parts; {out.strip()}")
    finally:
        server.stop()


def test_without_the_server_back_nothing_is_left(tmp_path: Path) -> None:
    from tests.s3server import start_s3

    state = tmp_path / "s3"
    server = start_s3(state)
    name = bucket(server)
    server.put_object(name, "m/model.bin", os.urandom(2 * MiB))
    env = fetch_env(server, tmp_path)
    server.stop()
    run = fetch(env, "--uri", f"s3://{name}/m/model.bin", "--dest", str(tmp_path / "models" / "m"),
                "--retries", "2", "--timeout", "2")
    assert run.code == 1
    assert run.line == f"Fetch of s3://{name}/m/model.bin failed: could not connect to {server.endpoint} for " \
                       f"s3://{name}/m/model.bin (after 3 attempts)"
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize("with_digest", [True, False])
def test_one_cache_four_fetches_one_download(s3_server: S3Server, tmp_path: Path, with_digest: bool) -> None:
    name = bucket(s3_server)
    data = os.urandom(5 * MiB)
    s3_server.put_object(name, "m/model.safetensors", data)
    cache = tmp_path / "cache"
    extra = ["--digest", sha(data)] if with_digest else []
    env = fetch_env(s3_server, tmp_path, SHIPYARD_FETCH_CACHE=str(cache))
    first = fetch(env, "--uri", f"s3://{name}/m/model.safetensors", "--dest", str(tmp_path / "d0"), *extra)
    assert first.code == 0, first.log
    runs: list[Any] = [subprocess.Popen(
        [sys.executable, "-m", "shipyard.runtime.cli", "fetch", "--uri", f"s3://{name}/m/model.safetensors",
         "--dest", str(tmp_path / f"d{i}"), *extra], env={**env, contract.ENV_TERMINATION_LOG: ""},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2, 3)]
    outputs = [p.communicate(timeout=120) for p in runs]
    assert [p.returncode for p in runs] == [0, 0, 0], outputs
    assert s3_server.downloads(name, "m/model.safetensors") == 1
    assert all("cacheHit=true" in out for out, _ in outputs)
    for i in range(4):
        assert (tmp_path / f"d{i}" / "model.safetensors").read_bytes() == data


@pytest.fixture
def concurrent_bucket(s3_server: S3Server) -> Iterator[str]:
    yield bucket(s3_server)


def test_four_fetches_at_once_download_once(s3_server: S3Server, tmp_path: Path, concurrent_bucket: str) -> None:
    name = concurrent_bucket
    data = os.urandom(40 * MiB)
    s3_server.put_object(name, "m/model.safetensors", data)
    env = fetch_env(s3_server, tmp_path, SHIPYARD_FETCH_CACHE=str(tmp_path / "cache"), SHIPYARD_FETCH_DIGEST=sha(data))
    env[contract.ENV_TERMINATION_LOG] = ""
    runs = [subprocess.Popen([sys.executable, "-m", "shipyard.runtime.cli", "fetch", "--uri",
                              f"s3://{name}/m/model.safetensors", "--dest", str(tmp_path / f"d{i}")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outputs = [p.communicate(timeout=120) for p in runs]
    assert [p.returncode for p in runs] == [0] * 4, outputs
    assert s3_server.downloads(name, "m/model.safetensors") == -(-len(data) // PART)  # one download, in 3 parts
    assert sum("cacheHit=true" in out for out, _ in outputs) == 3
