"""What the paper's synthetic experiment measures (BUILD_NOTES.md, "Synthetic experiment"), on
generated strings.

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


# What a model knows about each kind of target, without Z: a `!` has probability 1/16 anywhere, so
# its cross-entropy cannot fall below ln 16 unless Z tells where the noise is.
CE_BANG_WITHOUT_Z = float(np.log(16.0))


def ce_by_class(nll_BT: np.ndarray, targets_BT: np.ndarray) -> dict[str, float]:
    """Mean per-token cross-entropy split by the kind of target: ``bang`` (a `!`), ``letter`` (a
    letter of the body) and ``underscore``. ``targets_BT`` are the token ids that follow the inputs
    of full 66-token records (so column 0 is the prompt's ``>``, which is left out)."""
    from free_transformer_jax.data import synthetic

    nll, tgt = np.asarray(nll_BT, np.float64)[:, 1:], np.asarray(targets_BT)[:, 1:]
    kinds = {"bang": tgt == synthetic.BANG, "underscore": tgt == synthetic.UNDERSCORE,
             "letter": tgt < synthetic.UNDERSCORE}  # A..Z are the ids below `_`
    return {k: float(nll[m].mean()) if m.any() else float("nan") for k, m in kinds.items()}


def latent_feature_corr(p_BTH: np.ndarray, targets_BT: np.ndarray,
                        run_start_B: np.ndarray) -> dict[str, float]:
    """The largest |correlation|, over the latent bits, between a bit's posterior probability at
    position t and a fact about the target t predicts: ``noise`` (the target is a `!`) and
    ``before_run`` (the target lies before the run, ``run_start_B`` = start in the body). Column 0
    (the prompt's ``>``) is left out; a bit that never varies counts as 0."""
    from free_transformer_jax.data import synthetic

    p = np.asarray(p_BTH, np.float64)[:, 1:]
    tgt = np.asarray(targets_BT)[:, 1:]
    body_index = np.arange(tgt.shape[1])[None, :]  # target column j + 1 is body character j
    facts = {"noise": tgt == synthetic.BANG,
             "before_run": body_index < np.asarray(run_start_B)[:, None]}
    out = {}
    for name, fact in facts.items():
        f = fact.reshape(-1).astype(np.float64)
        best = 0.0
        for h in range(p.shape[-1]):
            x = p[..., h].reshape(-1)
            if x.std() > 0 and f.std() > 0:
                best = max(best, abs(float(np.corrcoef(x, f)[0, 1])))
        out[name] = best
    return out


def mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# Thresholds of the paper's ordering (:func:`paper_ordering`), on seed-averaged metrics. Chance
# position agreement is about 0.05 (two uniform starts in [0, 56] within 1 of each other); with 6
# prompts x 3 groups x 28 pairs per model its standard error is about 0.01.
NEAR = 0.05  # "near the independent level": |shared - independent| <= NEAR
CLEARLY = 0.10  # "clearly above": a margin of at least CLEARLY
VALIDITY_DROP = 0.20  # "validity drops at 8 bits": at least this far below the baseline's
KL_SLACK = 1.10  # "KL at or below kappa": kl_bits <= KL_SLACK * kappa


def paper_ordering(means: dict) -> list[dict]:
    """The paper's ordering checks on a sweep's seed-averaged metrics.

    ``means`` maps kappa in bits (None for the baseline) to a dict of metric means (the keys of
    ``launch/synthetic_sweep.py``'s METRICS). Returns one dict per check that the sweep's kappas
    allow: ``check`` (what the paper says), ``detail`` (the numbers) and ``ok``. Noise agreement
    is compared as the excess of shared-Z groups over independent ones, because many generated
    ``!`` raise the overlap of independent groups too.
    """
    def get(k, m):
        v = means.get(k, {}).get(m)
        return None if v is None else float(v)

    def excess(k, prefix):
        s, i = get(k, f"{prefix}_shared"), get(k, f"{prefix}_indep")
        return None if s is None or i is None else s - i

    checks = []
    e = excess(1 / 64, "pos_agree")
    if e is not None:
        checks.append({"check": "position agreement near independent at 1/64 bit",
                       "detail": f"shared - indep = {e:+.3f} (|.| <= {NEAR})", "ok": abs(e) <= NEAR})
    for k, name in ((1 / 8, "1/8 bit"), (1.0, "1 bit")):
        e = excess(k, "pos_agree")
        if e is not None:
            checks.append({"check": f"position agreement clearly above independent at {name}",
                           "detail": f"shared - indep = {e:+.3f} (>= {CLEARLY})", "ok": e >= CLEARLY})
    e8, e1 = excess(1 / 8, "noise_agree"), excess(1.0, "noise_agree")
    if e8 is not None and e1 is not None:
        checks.append({"check": "noise agreement clearly higher at 1 bit than at 1/8 bit",
                       "detail": f"excess over indep: 1 bit {e1:+.3f}, 1/8 bit {e8:+.3f} "
                                 f"(difference >= {CLEARLY})", "ok": e1 - e8 >= CLEARLY})
    v8, vb = get(8.0, "validity"), get(None, "validity")
    if v8 is not None and vb is not None:
        checks.append({"check": "validity drops at 8 bits",
                       "detail": f"8 bits {v8:.3f}, baseline {vb:.3f} (drop >= {VALIDITY_DROP})",
                       "ok": vb - v8 >= VALIDITY_DROP})
    for k in sorted(k for k in means if k is not None):
        kl = get(k, "kl_bits")
        if kl is not None:
            checks.append({"check": f"final KL at or below kappa = {k:g} bit",
                           "detail": f"KL {kl:.4f} bits/token (<= {KL_SLACK:g} x kappa)",
                           "ok": kl <= KL_SLACK * k})
    return checks
