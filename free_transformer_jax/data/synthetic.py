"""The paper's synthetic task (paper section 4.1; BUILD_NOTES.md, "Synthetic experiment") as a
deterministic random-access source.

Alphabet (29 ids, fixed order): ``A``..``Z`` = 0..25, ``_`` = 26, ``!`` = 27, ``>`` = 28.
A record is 66 ids: ``<letter> >`` then 64 characters. The 64 characters start as underscores, the
letter is written 8 times from a start position uniform in [0, 56], then every character is
independently replaced by ``!`` with probability 1/16. Record ``i`` depends only on
``(seed, i)``: its numpy Generator is seeded from that pair, so any record can be read in any order
by any process or worker.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ_!>"
VOCAB_SIZE = len(ALPHABET)  # 29
UNDERSCORE = ALPHABET.index("_")  # 26
BANG = ALPHABET.index("!")  # 27
PROMPT_SEP = ALPHABET.index(">")  # 28
BODY_LEN = 64  # characters after the prompt
RUN_LEN = 8  # the letter is written this many times
MAX_START = BODY_LEN - RUN_LEN  # 56: start positions are uniform in [0, MAX_START]
NOISE_PROB = 1.0 / 16.0
PROMPT_LEN = 2  # "<letter>>"
SEQ_TOKENS = PROMPT_LEN + BODY_LEN  # 66 tokens per record (65 input/target pairs)
_DOMAIN = 0x5F7E_0001  # separates this generator's seed stream from any other use of (seed, i)

_CHAR_TO_ID = {c: i for i, c in enumerate(ALPHABET)}


def encode(text: str) -> list[int]:
    """Characters of the 29-symbol alphabet -> ids; any other character is a ValueError."""
    try:
        return [_CHAR_TO_ID[c] for c in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the synthetic alphabet "
                         f"{ALPHABET!r}") from None


def decode(ids) -> str:
    """Ids -> characters; an id outside [0, 29) decodes to ``?`` rather than failing."""
    return "".join(ALPHABET[i] if 0 <= i < VOCAB_SIZE else "?" for i in np.asarray(ids).tolist())


@dataclasses.dataclass(frozen=True)
class SyntheticRecord:
    """One record with the latent facts that generated it.

    ids: (66,) int32, the training sequence (prompt + noisy body).
    clean_ids: (66,) int32, the same sequence before the ``!`` noise.
    letter: 0..25 (the prompt letter's id).  start: 0..56, where the 8-letter run starts in the
    64-character body (add PROMPT_LEN for the index in ``ids``).  noise: (64,) bool, which body
    characters were replaced by ``!``.
    """

    ids: np.ndarray
    clean_ids: np.ndarray
    letter: int
    start: int
    noise: np.ndarray

    @property
    def text(self) -> str:
        return decode(self.ids)


def generate(index: int, seed: int = 0) -> SyntheticRecord:
    """Record ``index`` of synthetic dataset ``seed`` (both non-negative integers)."""
    if index < 0 or seed < 0:
        raise ValueError(f"index={index} and seed={seed} must be >= 0")
    rng = np.random.default_rng([_DOMAIN, int(seed), int(index)])
    letter = int(rng.integers(0, 26))
    start = int(rng.integers(0, MAX_START + 1))
    return make_record(letter, start, rng.random(BODY_LEN) < NOISE_PROB)


def make_record(letter: int, start: int, noise) -> SyntheticRecord:
    """The record with these latent facts: prompt letter id 0..25, run start 0..56 in the body and
    the (64,) bool mask of body characters replaced by ``!``."""
    noise = np.asarray(noise, bool)
    if not 0 <= letter < 26 or not 0 <= start <= MAX_START or noise.shape != (BODY_LEN,):
        raise ValueError(f"make_record(letter={letter}, start={start}, noise of shape "
                         f"{noise.shape}): expected 0 <= letter < 26, 0 <= start <= {MAX_START} "
                         f"and a ({BODY_LEN},) mask")
    body = np.full(BODY_LEN, UNDERSCORE, np.int32)
    body[start:start + RUN_LEN] = letter
    prompt = np.array([letter, PROMPT_SEP], np.int32)
    clean = np.concatenate([prompt, body])
    body = np.where(noise, BANG, body).astype(np.int32)
    return SyntheticRecord(ids=np.concatenate([prompt, body]), clean_ids=clean, letter=int(letter),
                           start=int(start), noise=noise)


class SyntheticSource:
    """Random-access source of ``size`` records (int32 arrays of 66 ids), records
    ``offset .. offset + size - 1`` of dataset ``seed``. Train and eval use disjoint offsets."""

    def __init__(self, size: int, seed: int = 0, offset: int = 0):
        if size < 1:
            raise ValueError(f"data.synthetic_size={size}: must be >= 1")
        self._size, self._seed, self._offset = int(size), int(seed), int(offset)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> np.ndarray:
        return self.record(index).ids

    def record(self, index: int) -> SyntheticRecord:
        """Record ``index`` of this source with its latent facts (letter, run start, noise)."""
        if not 0 <= index < self._size:
            raise IndexError(f"synthetic record {index} out of range [0, {self._size})")
        return generate(self._offset + int(index), self._seed)

    def __repr__(self) -> str:
        return f"SyntheticSource(size={self._size}, seed={self._seed}, offset={self._offset})"
