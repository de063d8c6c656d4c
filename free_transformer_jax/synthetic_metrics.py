"""What the paper's synthetic experiment measures (SPEC section 7), on generated strings.

A sequence is ``<L>>`` + 64 body characters. It is *valid* when its body holds only ``_``, ``!``
and the prompt letter L, and every L lies inside one window of 8 consecutive characters that are
all L or ``!`` (one 8-long run, noise allowed). Its *target position* is where the prompt letter
first appears in the body (defined for broken sequences too, so position agreement can still be
measured where Z breaks generation). Agreement metrics compare the sequences of one group (same
prompt; Z shared or not).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

RUN = 8
BODY = 64
PROMPT = 2


def target_position(seq: str) -> int | None:
    """Index in the body of the prompt letter's first occurrence (None if it never appears)."""
    if len(seq) < PROMPT + 1:
        return None
    pos = seq[PROMPT:PROMPT + BODY].find(seq[0])
    return None if pos < 0 else pos


def target_start(seq: str) -> int | None:
    """Start (in the 64-character body) of the 8-long run of the prompt letter, or None if invalid."""
    if len(seq) < PROMPT + BODY or seq[1] != ">":
        return None
    letter, body = seq[0], seq[PROMPT:PROMPT + BODY]
    if set(body) - {"_", "!", letter}:
        return None
    hits = [i for i, ch in enumerate(body) if ch == letter]
    if not hits:
        return None
    for s in range(max(0, hits[-1] - RUN + 1), min(hits[0], BODY - RUN) + 1):
        if all(ch in (letter, "!") for ch in body[s:s + RUN]):
            return s
    return None


def noise_positions(seq: str) -> frozenset[int]:
    return frozenset(i for i, ch in enumerate(seq[PROMPT:PROMPT + BODY]) if ch == "!")


def position_agreement(seqs: Sequence[str], tolerance: int = 1) -> float | None:
    """Fraction of pairs of sequences whose target positions are within ``tolerance``; None when
    fewer than two sequences contain the prompt letter."""
    starts = [s for s in map(target_position, seqs) if s is not None]
    pairs = list(itertools.combinations(starts, 2))
    if not pairs:
        return None
    return float(np.mean([abs(a - b) <= tolerance for a, b in pairs]))


def noise_agreement(seqs: Sequence[str]) -> float | None:
    """Mean Jaccard overlap of the ``!`` positions over pairs of sequences (pairs where neither has
    any ``!`` are skipped); None when no pair counts."""
    sets = [noise_positions(s) for s in seqs]
    scores = [len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2) if a | b]
    return float(np.mean(scores)) if scores else None


def validity(seqs: Sequence[str]) -> float:
    return float(np.mean([target_start(s) is not None for s in seqs]))


def mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
