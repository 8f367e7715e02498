"""What every result file under bench/results/ records about its run, shared by the benchmark scripts."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def fetch_git_state(repo: Path = REPO) -> tuple[str | None, str | None]:
    """`git rev-parse HEAD` and `git status --porcelain` of the repository (None where git cannot tell)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    return (head.strip() or None) if head else None, git("status", "--porcelain")


def build_meta(
    git_head: str | None,
    git_status: str | None,
    *,
    python: str,
    torch_version: str,
    platform_name: str,
    load_before: tuple[float, ...],
    load_after: tuple[float, ...],
    started: float,
    finished: float,
) -> dict[str, Any]:
    """What a result file needs to be traced back and judged: the code (commit, and whether the working tree had
    uncommitted changes when the run started, with their paths), the interpreter and torch, the platform, the load
    average around the run and its UTC start/end (epoch seconds in). Pure; `gitDirty` is None when git could not
    tell."""
    changed = None if git_status is None else [line[3:] for line in git_status.splitlines() if line.strip()]

    def utc(seconds: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))

    return {
        "gitCommit": git_head,
        "gitDirty": None if changed is None else bool(changed),
        "gitDirtyFiles": (changed or [])[:50],
        "python": python,
        "torch": torch_version,
        "platform": platform_name,
        "loadBefore": [round(x, 2) for x in load_before],
        "loadAfter": [round(x, 2) for x in load_after],
        "startedAt": utc(started),
        "finishedAt": utc(finished),
        "seconds": round(finished - started, 1),
    }


def summarize_profile(collapsed: Path, top: int = 30, preamble: tuple[str, ...] = ()) -> str:
    """The functions with the most py-spy samples in a collapsed-stack file (py-spy record --format raw): own (leaf)
    and cumulative, in percent of all samples; `preamble` lines go after the sample count."""
    own: dict[str, int] = {}
    cumulative: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            cumulative[frame] = cumulative.get(frame, 0) + count
    lines = [f"{total} samples", *preamble]
    for title, table in (("own", own), ("cumulative", cumulative)):
        lines.append(f"--- {title}")
        for frame, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{100.0 * count / max(1, total):5.1f}%  {frame}")
    return "\n".join(lines)
