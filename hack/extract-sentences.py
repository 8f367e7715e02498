"""Regenerate runtime/shipyard/runtime/data/python-docs-sentences.txt: real English sentences from the Python
documentation that CPython ships (`pydoc_data.topics`, PSF License Version 2; see LICENSE-PSF.txt next to the file).

    python hack/extract-sentences.py > runtime/shipyard/runtime/data/python-docs-sentences.txt

Deterministic for a given Python version (the committed file was made with the one in its header): the topics'
text is split into sentences, prose is kept (6 to 45 words, 30 to 260 characters, letters, digits and plain
punctuation only: no code, markup or references), duplicates are dropped, and 640 are taken in the order of their
sha256 (a fixed pseudo-random sample over every topic).
"""

from __future__ import annotations

import hashlib
import platform
import pydoc_data.topics
import re

COUNT = 640
PROSE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()\-\"/%]+[.?!]")


def build_sentences(text: str, count: int = COUNT) -> list[str]:
    """The sample (pure)."""
    flat = re.sub(r"\s+", " ", text)
    candidates = {s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat)
                  if PROSE.fullmatch(s) and 30 <= len(s) <= 260 and 6 <= len(s.split()) <= 45 and "()" not in s}
    return sorted(candidates, key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:count]


def main() -> None:
    sentences = build_sentences(" ".join(pydoc_data.topics.topics.values()))
    print(f"# {len(sentences)} English sentences from the Python {platform.python_version()} documentation "
          "(pydoc_data.topics), by hack/extract-sentences.py.")
    print("# Copyright (c) 2001 Python Software Foundation; All Rights Reserved. "
          "PSF License Version 2: LICENSE-PSF.txt.")
    for sentence in sentences:
        print(sentence)


if __name__ == "__main__":
    main()
