"""The errors of `shipyard-runtime fetch` and the messages they carry. Pure.

Every message names the object (`s3://bucket/key`, `https://host/path`, an archive entry) and never a secret: URIs
are shown by `sources.Source.display`, which leaves out userinfo and query strings (a presigned URL's signature).
"""

from __future__ import annotations


class FetchError(Exception):
    """A fetch that failed; `retryable` errors (connection errors, 5xx, 429, timeouts) are tried again."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class UsageError(FetchError):
    """A flag or environment variable that is missing or invalid (exit 2)."""


class ArchiveError(FetchError):
    """An archive entry that is refused (path traversal, link out, device file, decompression bomb)."""


class DigestMismatch(FetchError):
    """The content does not have the expected digest."""


class Interrupted(FetchError):
    """SIGTERM or SIGINT: the fetch stops and removes what it staged."""


STATUS_NAMES = {
    400: "bad request",
    401: "unauthorized",
    403: "access denied",
    404: "not found",
    405: "method not allowed",
    408: "request timeout",
    410: "gone",
    412: "precondition failed",
    416: "range not satisfiable",
    429: "too many requests",
}


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another try: 408, 429 and every 5xx; never 401, 403 or 404. Pure."""
    return status in (408, 429) or 500 <= status <= 599


def build_status_message(status: int, display: str, code: str | None = None) -> str:
    """The message for an HTTP status from a source, e.g. `access denied (403) to s3://b/k: SignatureDoesNotMatch`,
    `not found (404): s3://b/k`. `code` is the S3 error code (never a secret), left out when it only repeats the
    status. Pure."""
    detail = f": {code}" if code and code != str(status) and code.lower().replace(" ", "") not in {
        "accessdenied", "nosuchkey", "notfound", "forbidden"} else ""
    if status == 403:
        return f"access denied (403) to {display}{detail}"
    if status == 401:
        return f"unauthorized (401) for {display}{detail}"
    if status == 404:
        return f"not found (404): {display}{detail}"
    if 500 <= status <= 599:
        return f"server error ({status}) from {display}{detail}"
    name = STATUS_NAMES.get(status)
    return f"{name} ({status}) from {display}{detail}" if name else f"HTTP {status} from {display}{detail}"


def build_timeout_message(seconds: float, display: str, detail: str) -> str:
    """`timed out after 30 s reading https://host/path (slow server: ...)`. Pure."""
    return f"timed out after {seconds:g} s reading {display} ({detail})"


def build_digest_mismatch_message(expected: str, got: str, display: str) -> str:
    """`digest mismatch: expected sha256:..., got sha256:... (https://host/path)`. Pure."""
    return f"digest mismatch: expected {expected}, got {got} ({display})"
