"""Fetch benchmark: a 1 GiB object from the stack's S3 server (versitygw on 127.0.0.1, tests/s3server.py), side by side
in one run:

- **Shipyard's fetch** (`shipyard.runtime.fetch.command.run_fetch`, in process: parallel ranged GETs of 16 MiB, 8 at a
  time, hashed as they land, staged and renamed into place; the sha256 of the whole file is part of its time);
- **boto3 `download_file`** at its defaults (s3transfer: 8 MiB parts, 10 threads), which does no hashing, and the same
  followed by a sha256 of the file (what a fetcher that verifies the digest afterwards pays);
- **boto3 `download_file` tuned** like fetch (TransferConfig: 16 MiB parts, 8 threads, 1 MiB io chunks);
- **the disk**: 1 GiB written with `dd` (1 MiB blocks, `conv=fsync`), the ceiling of any download to this disk.

Each method runs `--repetitions` times, interleaved (every method once, then again), each into a fresh file that is
removed afterwards; the table gives the median seconds and MB/s (10^6 bytes per second) and the ratio to the disk.
The server reads the object from its page cache (it was just uploaded, and 1 GiB fits in memory), and the client
and the server share the machine's cores: on 2 cores the figures measure CPU (TLS is off, SigV4 signs headers only)
as much as I/O (the disk row is the ceiling, not a target). Writes bench/results/fetch.json with the machine and
the commit, and ends with `targets: K/N met`.

    .venv/bin/python bench/fetch_bench.py [--size-mib 1024] [--repetitions 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "contract", REPO / "runtime"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench import benchmeta  # noqa: E402
from shipyard.runtime.fetch import command  # noqa: E402

RESULTS = REPO / "bench" / "results" / "fetch.json"
MiB = 1 << 20
BUCKET = "bench"
KEY = "llm/model.safetensors"


def make_object(path: Path, size: int) -> str:
    """`size` bytes of random data (16 MiB of urandom repeated: incompressible for every layer in between);
    returns its sha256 digest."""
    block = os.urandom(16 * MiB)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            chunk = block[: min(len(block), size - written)]
            handle.write(chunk)
            digest.update(chunk)
            written += len(chunk)
    return "sha256:" + digest.hexdigest()


def time_disk(target: Path, size: int) -> float:
    started = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={size // MiB}", "conv=fsync"],
                   check=True, capture_output=True)
    return time.monotonic() - started


def time_fetch(server: Any, dest: Path, digest: str) -> float:
    env = server.env()
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        config = command.FetchConfig(uri=f"s3://{BUCKET}/{KEY}", dest=str(dest), digest=digest)
        started = time.monotonic()
        outcome = command.run_fetch(config)
        seconds = time.monotonic() - started
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert outcome.digest == digest, outcome
    return seconds


def time_boto3(server: Any, target: Path, digest: str, *, tuned: bool, verify: bool) -> float:
    from boto3.s3.transfer import TransferConfig

    client = server.client()
    config = TransferConfig(multipart_chunksize=16 * MiB, max_concurrency=8, io_chunksize=MiB) if tuned \
        else TransferConfig()
    started = time.monotonic()
    client.download_file(BUCKET, KEY, str(target), Config=config)
    if verify:
        from shipyard.runtime.fetch import digests

        assert "sha256:" + digests.hash_file(target)[0] == digest
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    from tests.s3server import start_s3

    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="shipyard-fetch-bench-", dir=args.work))
    free = shutil.disk_usage(work).free
    if free < 4 * size:
        print(f"not enough disk in {work}: {free / 2**30:.1f} GiB free, need {4 * size / 2**30:.1f} GiB")
        return 2
    load_before, started = os.getloadavg(), time.time()
    head, status = benchmeta.fetch_git_state()
    server = start_s3(work / "s3")
    runs: dict[str, list[float]] = {}
    try:
        source = work / "source.bin"
        digest = make_object(source, size)
        server.make_bucket(BUCKET)
        upload_started = time.monotonic()
        server.put_object(BUCKET, KEY, source)
        upload_s = time.monotonic() - upload_started
        source.unlink()
        methods: dict[str, Callable[[Path], float]] = {
            "disk: dd 1 MiB blocks, fsync": lambda p: time_disk(p, size),
            "Shipyard fetch (8 x 16 MiB ranged GETs, sha256)": lambda p: time_fetch(server, p, digest),
            "boto3 download_file, defaults": lambda p: time_boto3(server, p, digest, tuned=False, verify=False),
            "boto3 download_file, defaults, then sha256": lambda p: time_boto3(server, p, digest, tuned=False,
                                                                               verify=True),
            "boto3 download_file, 8 x 16 MiB (tuned)": lambda p: time_boto3(server, p, digest, tuned=True,
                                                                            verify=False),
        }
        for rep in range(args.repetitions):
            for name, run in methods.items():
                target = work / f"out-{rep}"
                seconds = run(target)
                runs.setdefault(name, []).append(seconds)
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
                print(f"  rep {rep + 1} {name}: {seconds:.2f} s", flush=True)
        gets = server.downloads(BUCKET, KEY)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = {name: {"seconds": runs[name], "medianSeconds": statistics.median(runs[name]),
                   "mbPerSecond": size / statistics.median(runs[name]) / 1e6} for name in runs}
    disk = rows["disk: dd 1 MiB blocks, fsync"]["mbPerSecond"]
    fetch = rows["Shipyard fetch (8 x 16 MiB ranged GETs, sha256)"]
    boto_default = rows["boto3 download_file, defaults"]
    boto_verified = rows["boto3 download_file, defaults, then sha256"]
    targets = [
        ("fetch (with its sha256) at least as fast as boto3 download_file at its defaults (no sha256)",
         fetch["mbPerSecond"] >= boto_default["mbPerSecond"]),
        ("fetch faster than boto3 download_file then sha256", fetch["mbPerSecond"] > boto_verified["mbPerSecond"]),
        ("fetch within 10% of boto3 download_file tuned alike (16 MiB x 8), which does no sha256",
         fetch["mbPerSecond"] >= 0.9 * rows["boto3 download_file, 8 x 16 MiB (tuned)"]["mbPerSecond"]),
    ]
    print()
    print(f"Fetch benchmark: {size / 2**30:.2f} GiB object from versitygw on 127.0.0.1, {args.repetitions} "
          f"repetitions interleaved, {os.cpu_count()} cores, load {load_before[0]:.2f} before / "
          f"{os.getloadavg()[0]:.2f} after; upload {upload_s:.1f} s; {gets} GETs counted by the server")
    print()
    print(f"{'method':<50} {'median s':>9} {'MB/s':>8} {'x disk':>7}")
    print("-" * 77)
    for name, row in rows.items():
        print(f"{name:<50} {row['medianSeconds']:>9.2f} {row['mbPerSecond']:>8.0f} {row['mbPerSecond'] / disk:>7.2f}")
    print()
    for label, ok in targets:
        print(f"[{'met ' if ok else 'MISS'}] {label}")
    meta = benchmeta.build_meta(head, status, python=platform.python_version(), torch_version="not used",
                                platform_name=platform.platform(), load_before=load_before,
                                load_after=os.getloadavg(), started=started, finished=time.time())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "meta": meta, "sizeBytes": size, "repetitions": args.repetitions, "uploadSeconds": upload_s,
        "serverGets": gets, "rows": rows, "targets": [{"target": t, "met": ok} for t, ok in targets],
        "versions": {p: importlib.metadata.version(p) for p in ("boto3", "botocore", "s3transfer", "urllib3")},
    }, indent=2) + "\n")
    print(f"targets: {sum(ok for _, ok in targets)}/{len(targets)} met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
