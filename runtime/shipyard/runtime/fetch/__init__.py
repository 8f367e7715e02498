"""`shipyard-runtime fetch`: downloads a model from object storage (`s3://`), HTTPS or an OCI registry (`oci://`) before
it is loaded (an init container, the compression Job, the node agent's image volumes), verified against a digest, placed
atomically, cached per node. See docs/model-sources.md.

Modules: `sources` (URIs), `digests` (the digest of a file or a directory), `archives` (safe extraction), `retry`
(backoff, deadline), `progress`, `https` and `s3` (the fetchers; boto3 is imported only for `s3://`), `oci` (the OCI
distribution API: manifests, verified blobs, artifacts and image layers, registry credentials), `cache`, `staging`
(atomic placement) and `command` (flags, the fetch, the summary line).
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from shipyard.runtime.fetch.command import main as run

    return run(argv)
