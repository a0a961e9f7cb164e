"""The texts every benchmark embeds: STS-B dev sentences plus paragraphs of 100-300 words.

Short sentences are what titles and queries look like; paragraphs are what
abstracts look like, and they carry most of the compute (a 256-token window costs
about 20 times a 13-token sentence). The paragraphs are runs of consecutive STS
sentences cut at a seeded random length, so every run of a benchmark, on every
machine, embeds exactly the same strings.

Imports nothing beyond the standard library, so the GPU benchmark can use it on a
machine without Spark.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARAGRAPH_WORDS = (100, 300)


def shared_data_dir() -> Path | None:
    """``$DELTAVEC_SHARED_DATA``, else the first ``shared/data`` above the checkout."""
    override = os.environ.get("DELTAVEC_SHARED_DATA")
    candidates = [Path(override)] if override else []
    candidates += [parent / "shared" / "data" for parent in [REPO, *REPO.parents]]
    for candidate in candidates:
        if (candidate / "stsbenchmark" / "sts-dev.csv").exists():
            return candidate
    return None


def sentences() -> tuple[list[str], str]:
    """Short texts and where they came from.

    The 3,000 sentences of the STS-B dev split when it is on this machine; otherwise
    the titles and sentences of the demo papers shipped in the package (a GPU
    machine may have the code but not ``shared/data``).
    """
    data = shared_data_dir()
    if data is not None:
        out: list[str] = []
        with (data / "stsbenchmark" / "sts-dev.csv").open(encoding="utf-8") as fh:
            for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
                out += [row[5], row[6]]
        return out, "STS-B dev sentences"
    papers = REPO / "streaming" / "deltavec" / "commands" / "demo_data" / "papers.jsonl"
    out = []
    for line in papers.read_text(encoding="utf-8").splitlines():
        paper = json.loads(line)
        out.append(paper["title"])
        out += [s.strip() + "." for s in paper["abstract"].split(". ") if s.strip()]
    return out, "demo paper titles and sentences (STS-B data not found)"


def paragraphs(source: list[str], count: int, *, seed: int = 0) -> list[str]:
    """``count`` texts of 100-300 words, each a run of consecutive ``source`` sentences."""
    rng = random.Random(seed)
    out = []
    cursor = 0
    for _ in range(count):
        target = rng.randint(*PARAGRAPH_WORDS)
        words: list[str] = []
        while len(words) < target:
            words += source[cursor % len(source)].split()
            cursor += 1
        out.append(" ".join(words[:target]))
    return out


def mixed_texts(n_sentences: int, n_paragraphs: int, *, seed: int = 0) -> list[str]:
    """``n_sentences`` short texts (cycled when more are asked for than exist) and
    ``n_paragraphs`` paragraphs, shuffled together with a fixed seed."""
    short, _ = sentences()
    texts = [short[i % len(short)] for i in range(n_sentences)]
    texts += paragraphs(short, n_paragraphs, seed=seed)
    random.Random(seed).shuffle(texts)
    return texts


def sts_dev_pairs() -> list[tuple[float, str, str]]:
    """(gold score, sentence1, sentence2) of the 1,500 STS-B dev pairs; [] without the data."""
    data = shared_data_dir()
    if data is None:
        return []
    with (data / "stsbenchmark" / "sts-dev.csv").open(encoding="utf-8") as fh:
        rows = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(float(row[4]), row[5], row[6]) for row in rows]
