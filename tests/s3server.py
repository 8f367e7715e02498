"""The stack's S3-compatible server (hack/s3.py: versitygw, posix backend, on 127.0.0.1) as tests use it: start it in a
state directory, put buckets and objects in it with boto3, and count what clients fetched from its access log.

    server = start_s3(tmp_path / "s3")
    server.make_bucket("models")
    server.put_object("models", "digits/model.pt", Path("model.pt"))   # or bytes
    ...  # the code under test fetches s3://models/digits/model.pt from server.endpoint with server's keys
    assert server.downloads("models", "digits/model.pt") == 1
    server.stop()

`downloads` counts GET requests, not whole downloads: a client that fetches an object in ranged parts (boto3's
``download_file`` above its 8 MiB multipart threshold, or any fetcher that resumes or parallelizes with ``Range``)
makes one GetObject per part, and each counts. A HEAD (``s3_HeadObject``) never counts, nor does a failed GET.
The session fixture ``s3_server`` (tests/conftest.py) is one server shared by every test of a run: use bucket or key
names of the test's own, and compare counts before and after rather than from zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import stack

s3_mod = stack.load_hack_module("s3")

GET_OBJECT = "s3_GetObject"


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT (path-style addressing: /bucket/key)
    access_key: str
    secret_key: str
    region: str
    access_log: Path
    state_dir: Path
    pid: int

    def stop(self) -> None:
        """Stops the server (SIGTERM, SIGKILL after a grace period; returns once it is gone). Data and logs stay."""
        s3_mod.stop(self.state_dir)

    def requests(self) -> list[dict[str, Any]]:
        """Every request so far, parsed from the access log (hack/s3.py ``parse_access_log_line`` says the keys).
        A request is in the log when its response headers are sent: before a GetObject's body is."""
        return list(s3_mod.parse_access_log(self.access_log.read_text(errors="replace")))

    def downloads(self, bucket: str, key: str) -> int:
        """Successful GetObject requests (status 200 or 206) for `bucket`/`key` so far: one per GET, so a download in
        N ranged parts counts N (see the module's docstring)."""
        return sum(1 for r in self.requests()
                   if r["operation"] == GET_OBJECT and r["bucket"] == bucket and r["key"] == key
                   and r["status"] in (200, 206))

    def env(self) -> dict[str, str]:
        """The AWS SDK environment variables that point a client at this server with its root keys."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def client(self, *, access_key: str | None = None, secret_key: str | None = None, **config: Any) -> Any:
        """A boto3 S3 client for this server: path-style, SigV4, no retries; `access_key`/`secret_key` replace the
        root's (to be refused), `config` goes to botocore's Config."""
        import boto3  # a test-time dependency only (pyproject's dev group): not imported by the rest of the suite
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key if access_key is None else access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          retries={"max_attempts": 1, "mode": "standard"}, **config))

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def put_object(self, bucket: str, key: str, data: bytes | Path) -> None:
        """Uploads `data`: bytes in one PutObject; a file through boto3's managed transfer (``upload_file``: a
        multipart upload above its 8 MiB threshold)."""
        if isinstance(data, Path):
            self.client().upload_file(str(data), bucket, key)
        else:
            self.client().put_object(Bucket=bucket, Key=key, Body=data)


def start_s3(state_dir: Path, port: int | None = None) -> S3Server:
    """Starts hack/s3.py's server in `state_dir` and returns it once it answers. Raises RuntimeError when versitygw
    is not built (the message names ``bash hack/build-binaries.sh``) or does not start (with its log's tail)."""
    info = s3_mod.start(state_dir, port)
    return S3Server(endpoint=info["endpoint"], access_key=info["accessKey"], secret_key=info["secretKey"],
                    region=info["region"], access_log=Path(info["accessLog"]), state_dir=state_dir.resolve(),
                    pid=int(info["pid"]))
