"""OCI fetch benchmark: a model artifact from the stack's registry (CNCF distribution over TLS on 127.0.0.1,
tests/registry.py), pushed with the oras CLI in two shapes (8 shards of `--size-mib`/8, and one file of
`--size-mib`), pulled side by side in one run:

- **Shipyard's fetch** (`shipyard.runtime.fetch.command.run_fetch`, in process: the manifest, then the blobs in
  parallel (8 at a time) with each sha256 checked as it streams, staged and renamed into place);
- **`oras pull`** (oras v1.3.6, Go; it verifies each blob's digest too: the peer at its defaults, 3 blobs at a time);
- **Shipyard's fetch, a node cache hit** (`--cache` filled by one fetch before: one manifest GET, no blob, the entry's
  files verified again and hard-linked).

Each method runs `--repetitions` times, interleaved, into a fresh directory removed afterwards; the table gives the
median seconds and MiB/s. Client, registry and TLS share the machine's cores (2 here): the figures measure CPU as much
as I/O. Writes bench/results/fetch_oci.json with the machine and the commit, and ends with `targets: K/N met`.

    .venv/bin/python bench/fetch_oci_bench.py [--size-mib 512] [--repetitions 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "contract", REPO / "runtime"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench import benchmeta  # noqa: E402
from shipyard.runtime.fetch import command  # noqa: E402

RESULTS = REPO / "bench" / "results" / "fetch_oci.json"
MiB = 1 << 20
SHAPES = {"8 shards": "bench/shards:v1", "1 file": "bench/one:v1"}


def write_random(path: Path, size: int) -> None:
    block = os.urandom(16 * MiB)
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            chunk = block[: min(len(block), size - written)]
            handle.write(chunk)
            written += len(chunk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    from tests.registry import start_registry

    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="shipyard-oci-bench-", dir=args.work))
    load_before, started = os.getloadavg(), time.time()
    head, status = benchmeta.fetch_git_state()
    registry = start_registry(work / "registry")
    runs: dict[str, list[float]] = {}
    try:
        source = work / "source"
        source.mkdir()
        shards = {}
        for i in range(8):
            write_random(source / f"shard-{i}.safetensors", size // 8)
            shards[f"shard-{i}.safetensors"] = source / f"shard-{i}.safetensors"
        write_random(source / "model.safetensors", size)
        push_started = time.monotonic()
        registry.push_artifact(SHAPES["8 shards"], shards)
        registry.push_artifact(SHAPES["1 file"], {"model.safetensors": source / "model.safetensors"})
        push_s = time.monotonic() - push_started
        shutil.rmtree(source)
        cache = work / "cache"

        def fetch(repo_tag: str, dest: Path, cached: bool) -> float:
            config = command.FetchConfig(uri=f"oci://{registry.address}/{repo_tag}", dest=str(dest),
                                         ca_bundle=str(registry.ca), cache=str(cache) if cached else None,
                                         termination_log="")
            begun = time.monotonic()
            outcome = command.run_fetch(config)
            assert outcome.cache_hit == cached, outcome
            return time.monotonic() - begun

        def oras(repo_tag: str, dest: Path) -> float:
            dest.mkdir()
            begun = time.monotonic()
            registry.oras("pull", f"{registry.address}/{repo_tag}", "-o", str(dest))
            return time.monotonic() - begun

        for repo_tag in SHAPES.values():  # fill the cache once
            fetch(repo_tag, work / "fill", cached=False)
            shutil.rmtree(work / "fill")
            config = command.FetchConfig(uri=f"oci://{registry.address}/{repo_tag}", dest=str(work / "fill"),
                                         ca_bundle=str(registry.ca), cache=str(cache), termination_log="")
            command.run_fetch(config)
            shutil.rmtree(work / "fill")
        methods: dict[str, Callable[[str, Path], float]] = {
            "Shipyard fetch": lambda r, p: fetch(r, p, cached=False),
            "oras pull": oras,
            "Shipyard fetch, cache hit": lambda r, p: fetch(r, p, cached=True),
        }
        for rep in range(args.repetitions):
            for shape, repo_tag in SHAPES.items():
                for name, run in methods.items():
                    target = work / f"out-{rep}"
                    seconds = run(repo_tag, target)
                    runs.setdefault(f"{name} ({shape})", []).append(seconds)
                    shutil.rmtree(target, ignore_errors=True)
                    print(f"  rep {rep + 1} {name} ({shape}): {seconds:.2f} s", flush=True)
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = {name: {"seconds": v, "medianSeconds": statistics.median(v),
                   "mibPerSecond": size / MiB / statistics.median(v)} for name, v in runs.items()}

    def rate(name: str) -> float:
        return float(rows[name]["mibPerSecond"])

    targets = [(f"fetch at least 0.75x oras pull's throughput ({shape}; both verify every blob)",
                rate(f"Shipyard fetch ({shape})") >= 0.75 * rate(f"oras pull ({shape})")) for shape in SHAPES]
    targets += [(f"a cache hit at least 3x faster than a download ({shape})",
                 rate(f"Shipyard fetch, cache hit ({shape})") >= 3 * rate(f"Shipyard fetch ({shape})"))
                for shape in SHAPES]
    print()
    print(f"OCI fetch benchmark: {args.size_mib} MiB artifact from distribution (TLS) on 127.0.0.1, "
          f"{args.repetitions} repetitions interleaved, {os.cpu_count()} cores, load {load_before[0]:.2f} before / "
          f"{os.getloadavg()[0]:.2f} after; push {push_s:.1f} s")
    print()
    print(f"{'method':<40} {'median s':>9} {'MiB/s':>8}")
    print("-" * 59)
    for name, row in rows.items():
        print(f"{name:<40} {row['medianSeconds']:>9.2f} {row['mibPerSecond']:>8.0f}")
    print()
    for label, ok in targets:
        print(f"[{'met ' if ok else 'MISS'}] {label}")
    meta = benchmeta.build_meta(head, status, python=platform.python_version(), torch_version="not used",
                                platform_name=platform.platform(), load_before=load_before,
                                load_after=os.getloadavg(), started=started, finished=time.time())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "meta": meta, "sizeBytes": size, "repetitions": args.repetitions, "pushSeconds": push_s, "rows": rows,
        "targets": [{"target": t, "met": ok} for t, ok in targets],
        "versions": {"distribution": "v3.1.2", "oras": "v1.3.6"},
    }, indent=2) + "\n")
    print(f"targets: {sum(ok for _, ok in targets)}/{len(targets)} met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
