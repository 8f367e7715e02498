"""`shipyard-runtime fetch`: downloads a model from object storage (`s3://`) or HTTPS before it is loaded (an init
container, the compression Job), verified against a digest, placed atomically, cached per node. See
docs/model-sources.md.

Modules: `sources` (URIs), `digests` (the digest of a file or a directory), `archives` (safe extraction), `retry`
(backoff, deadline), `progress`, `https` and `s3` (the fetchers; boto3 is imported only for `s3://`), `cache`,
`staging` (atomic placement) and `command` (flags, the fetch, the summary line).
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from shipyard.runtime.fetch.command import main as run

    return run(argv)
