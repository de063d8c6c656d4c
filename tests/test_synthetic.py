"""The synthetic experiment: metric code on hand-made sequences, and the sweep end to end (tiny)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from free_transformer_jax import synthetic_metrics as sm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seq(letter, start, noise=(), run=8, extra=None):
    body = ["_"] * 64
    for i in range(start, start + run):
        body[i] = letter
    for i in noise:
        body[i] = "!"
    if extra is not None:
        body[extra] = letter
    return f"{letter}>" + "".join(body)


def test_validity_and_target_position():
    assert sm.target_start(seq("K", 10)) == 10 and sm.target_position(seq("K", 10)) == 10
    assert sm.target_start(seq("K", 0)) == 0 and sm.target_start(seq("K", 56)) == 56
    assert sm.target_start(seq("K", 10, noise=(12, 40))) == 10  # '!' inside the run is allowed
    assert sm.target_start(seq("K", 10, noise=(10,))) == 10  # even on its first letter
    assert sm.target_start(seq("K", 10, run=7)) is None  # too short
    assert sm.target_start(seq("K", 10, run=9)) is None  # too long
    assert sm.target_start(seq("K", 10, extra=40)) is None  # a second occurrence
    assert sm.target_position(seq("K", 10, extra=40)) == 10  # ...but the position is defined
    assert sm.target_start("K>" + "_" * 10 + "Q" * 8 + "_" * 46) is None  # the wrong letter
    assert sm.target_position("K>" + "_" * 64) is None
    assert sm.validity([seq("A", 3), seq("A", 3, run=5), seq("B", 20), "B>" + "_" * 64]) == 0.5


def test_agreement_values():
    same = [seq("K", 10, noise=(1, 2)), seq("K", 10, noise=(1, 2)), seq("K", 11, noise=(1, 3))]
    # positions 10, 10, 11: all pairs within 1
    assert sm.position_agreement(same) == 1.0
    spread = [seq("K", 0), seq("K", 20), seq("K", 40), seq("K", 21)]
    # 6 pairs, only (20, 21) within 1
    assert sm.position_agreement(spread) == pytest.approx(1 / 6)
    assert sm.position_agreement(spread, tolerance=20) == pytest.approx(4 / 6)
    assert sm.position_agreement([seq("K", 5)]) is None
    # '!' sets {1,2}, {1,2}, {1,3}: Jaccard 1, 1/3, 1/3
    assert sm.noise_agreement(same) == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert sm.noise_agreement([seq("K", 5), seq("K", 9)]) is None  # no '!' at all
    assert sm.mean_or_none([None, 0.5, 1.0]) == 0.75 and sm.mean_or_none([None]) is None


def test_ce_by_class():
    from free_transformer_jax.data import synthetic

    targets = np.array([[synthetic.BANG, synthetic.BANG, 3, synthetic.UNDERSCORE, 3],
                        [synthetic.PROMPT_SEP, synthetic.UNDERSCORE, synthetic.BANG, 7, 7]])
    nll = np.array([[9.0, 1.0, 2.0, 3.0, 4.0],
                    [9.0, 5.0, 6.0, 7.0, 8.0]])
    # column 0 (the prompt's '>') is left out, whatever it holds
    got = sm.ce_by_class(nll, targets)
    assert got == pytest.approx({"bang": (1 + 6) / 2, "letter": (2 + 4 + 7 + 8) / 4,
                                 "underscore": (3 + 5) / 2})
    assert np.isnan(sm.ce_by_class(nll[:, :2], targets[:, :2])["letter"])
    assert sm.CE_BANG_WITHOUT_Z == pytest.approx(2.7725887)


def test_latent_feature_corr():
    from free_transformer_jax.data import synthetic

    rng = np.random.default_rng(0)
    targets = np.where(rng.random((6, 65)) < 0.2, synthetic.BANG, synthetic.UNDERSCORE)
    starts = rng.integers(0, 57, 6)
    before = np.arange(64)[None] < starts[:, None]
    p = np.full((6, 65, 3), 0.5)
    p[:, 1:, 0] = np.where(targets[:, 1:] == synthetic.BANG, 0.9, 0.2)  # bit 0 = the noise
    p[:, 1:, 1] = np.where(before, 0.7, 0.4)  # bit 1 = before the run; bit 2 constant
    p[:, 0] = rng.random((6, 3))  # the '>' column is ignored
    got = sm.latent_feature_corr(p, targets, starts)
    assert got["noise"] == pytest.approx(1.0) and got["before_run"] == pytest.approx(1.0)
    flat = sm.latent_feature_corr(np.full((6, 65, 3), 0.5), targets, starts)
    assert flat == {"noise": 0.0, "before_run": 0.0}
    # independent random bits: small correlations
    noisy = sm.latent_feature_corr(rng.random((6, 65, 3)), targets, starts)
    assert max(noisy.values()) < 0.15


def _means(pos, noise, validity, kl):
    return {"pos_agree_shared": pos[0], "pos_agree_indep": pos[1], "noise_agree_shared": noise[0],
            "noise_agree_indep": noise[1], "validity": validity, "kl_bits": kl}


def test_paper_ordering_checks():
    paper_like = {None: _means((0.04, 0.04), (0.03, 0.03), 1.0, 0.0),
                  1 / 64: _means((0.05, 0.04), (0.03, 0.03), 0.99, 0.015),
                  1 / 8: _means((0.30, 0.05), (0.04, 0.03), 0.98, 0.12),
                  1.0: _means((0.60, 0.06), (0.30, 0.05), 0.90, 1.05),
                  8.0: _means((0.90, 0.10), (0.90, 0.60), 0.10, 7.5)}
    checks = sm.paper_ordering(paper_like)
    assert len(checks) == 1 + 2 + 1 + 1 + 4 and all(c["ok"] for c in checks)
    # break one thing at a time: each failure is reported by exactly its own check
    broken = {
        "position agreement near independent at 1/64 bit": (1 / 64, "pos_agree_shared", 0.20),
        "position agreement clearly above independent at 1 bit": (1.0, "pos_agree_shared", 0.10),
        "noise agreement clearly higher at 1 bit than at 1/8 bit": (1.0, "noise_agree_shared", 0.10),
        "validity drops at 8 bits": (8.0, "validity", 0.95),
        "final KL at or below kappa = 0.125 bit": (1 / 8, "kl_bits", 0.2),
    }
    for name, (k, metric, value) in broken.items():
        means = {kk: dict(v) for kk, v in paper_like.items()}
        means[k][metric] = value
        failed = [c["check"] for c in sm.paper_ordering(means) if not c["ok"]]
        assert failed == [name], (name, failed)
    # a sweep without 1/64 and 1 bit only runs the checks it can
    partial = sm.paper_ordering({None: paper_like[None], 8.0: paper_like[8.0]})
    assert [c["check"] for c in partial] == ["validity drops at 8 bits",
                                             "final KL at or below kappa = 8 bit"]


def test_sweep_end_to_end_tiny(tmp_path):
    out = str(tmp_path / "sweep")
    args = ["--kappas=1/8,8", "--seeds=0", "--prompts=2", "--shared_groups=1", "--group_size=3",
            "--eval_batches=1", "--config.train.steps=3", "--config.train.batch_size=8",
            "--config.train.log_every=1", "--config.model.d_model=32", "--config.model.n_layers=3",
            "--config.model.ffn_dim=64", "--config.model.latent_bits=4", "--config.data.synthetic_size=512"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "synthetic_sweep.py"),
                        f"--outdir={out}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[3/3]" in r.stdout  # progress: baseline, 1/8 bit, 8 bit
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res["summary"]) == {"baseline", "1/8 bit", "8 bit"}
    for name, metrics in res["summary"].items():
        assert 0 <= metrics["validity"]["mean"] <= 1
        assert len(metrics["kl_bits"]["per_seed"]) == 1
        for m in ("ce_bang_posterior", "ce_letter_posterior", "ce_underscore_posterior"):
            assert 0 < metrics[m]["mean"] < 10, (name, m)
        corr = metrics["corr_noise"]["mean"]
        assert corr is None if name == "baseline" else 0 <= corr <= 1
    assert res["summary"]["baseline"]["kl_bits"]["mean"] == 0.0
    assert res["summary"]["8 bit"]["kl_bits"]["mean"] > 0
    groups = res["samples"]["1/8 bit"]
    assert len(groups) == 2 * 2 and all(len(g) == 3 and len(g[0]) == 66 for g in groups.values())
    table, checks = open(os.path.join(out, "results.md")).read().split("\n\n", 1)
    assert table.count("\n") == 1 + 3 and "| 8 bit |" in table
    # the ordering checks the sweep's kappas allow: validity at 8 bits, KL <= kappa for both
    assert {c["check"] for c in res["checks"]} >= {"validity drops at 8 bits",
                                                   "final KL at or below kappa = 0.125 bit",
                                                   "final KL at or below kappa = 8 bit"}
    assert sum(line.startswith(("- PASS", "- FAIL")) for line in checks.splitlines()) == len(res["checks"])
    with open(os.path.join(out, "figure.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
