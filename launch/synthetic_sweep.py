"""The paper's synthetic experiment (Figures 3-4): train a kappa sweep plus the baseline, then
generate groups with independent and with shared Z and measure what Z learned.

    python launch/synthetic_sweep.py --outdir=outputs/synthetic_sweep

For each kappa in --kappas (bits per token) and the baseline, for each seed: train
configs/synthetic.py (resuming if the run exists), evaluate KL/CE, then for --prompts random
prompts generate one group with independent Z and --shared_groups groups with one shared Z
(each --group_size sequences). Writes results.json, results.md and figure.png into --outdir.
Interrupted? Run the same command again: finished models are read back, a model in training
resumes from its last checkpoint.
"""

import fractions
import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from common import run  # launch/common.py: one-line errors shared by the launchers

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Base config.",
                                          lock_config=True)
_OUTDIR = flags.DEFINE_string("outdir", "outputs/synthetic_sweep", "Runs, tables and the figure.")
_KAPPAS = flags.DEFINE_list("kappas", ["0.015625", "0.125", "1", "8"], "kappa in bits per token.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Training seeds.")
_BASELINE = flags.DEFINE_bool("baseline", True, "Also train the baseline (latent off).")
_PROMPTS = flags.DEFINE_integer("prompts", 6, "Random prompts per model.")
_SHARED = flags.DEFINE_integer("shared_groups", 3, "Shared-Z groups per prompt.")
_GROUP = flags.DEFINE_integer("group_size", 8, "Sequences per group.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Token sampling temperature.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 4, "Validation batches for KL/CE.")
_PROMPT_Z = flags.DEFINE_enum("prompt_z", "prior", ["prior", "encoder"],
                              "Z of the 2-token prompt: uniform like the rest of Z_1..Z_T (the "
                              "paper's 'Z sampled' groups), or sampled from the encoder run on the "
                              "prompt alone (the general prefill protocol).")

METRICS = ("pos_agree_shared", "pos_agree_indep", "noise_agree_shared", "noise_agree_indep",
           "validity", "kl_bits", "ce_posterior", "ce_prior")
# What Z encodes: the posterior's cross-entropy on each kind of target (see write_table).
PROBE = ("ce_bang_posterior", "ce_letter_posterior", "ce_underscore_posterior", "corr_noise",
         "corr_before_run")


def kappa_name(k: float | None) -> str:
    if k is None:
        return "baseline"
    frac = {1 / 64: "1/64", 1 / 8: "1/8", 1 / 4: "1/4", 1 / 2: "1/2"}
    return frac.get(k, f"{k:g}") + " bit"


def probe(cfg, params, config, seed, n_records=512):
    """Posterior cross-entropy by kind of target on ``n_records`` validation records: how much Z
    tells the decoder about the noise (`!` targets: ln 16 = 2.773 without Z) and the run (letter
    targets)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from free_transformer_jax import synthetic_metrics as sm
    from free_transformer_jax.data.sources import open_source
    from free_transformer_jax.model.transformer import FreeTransformer

    source = open_source(config, config.data.eval_split, training=False)
    records = [source.record(i) for i in range(min(n_records, len(source)))]
    ids = np.stack([r.ids for r in records])

    @jax.jit
    def apply(p, x, k):
        logits, aux = FreeTransformer(cfg).apply({"params": p}, x, latent="posterior",
                                                 rngs={"latent": k})
        bits = jax.nn.sigmoid(aux["bit_logits"]) if "bit_logits" in aux else None
        return jax.nn.log_softmax(logits, axis=-1), bits

    logp, bits = apply(params, jnp.asarray(ids[:, :-1]), jax.random.key(4000 + seed))
    nll = -np.take_along_axis(np.asarray(logp), ids[:, 1:, None], axis=-1)[..., 0]
    out = {f"ce_{k}_posterior": v for k, v in sm.ce_by_class(nll, ids[:, 1:]).items()}
    corr = (sm.latent_feature_corr(np.asarray(bits), ids[:, 1:], np.array([r.start for r in records]))
            if bits is not None else {"noise": None, "before_run": None})
    return {**out, **{f"corr_{k}": v for k, v in corr.items()}}


def run_model(base, kappa, seed, run_dir):
    """Train (or resume), evaluate, generate the groups; returns metrics and the groups' strings."""
    import jax
    import numpy as np

    from free_transformer_jax import data as data_lib
    from free_transformer_jax import evaluate as eval_lib
    from free_transformer_jax import synthetic_metrics as sm
    from free_transformer_jax.checkpoint import load_model
    from free_transformer_jax.data import synthetic
    from free_transformer_jax.generate import SamplingConfig, generate
    from free_transformer_jax.trainer import train

    config = base.copy_and_resolve_references()
    with config.unlocked():
        config.train.seed = seed
        config.model.latent = kappa is not None
        if kappa is not None:
            config.model.kappa_bits = kappa
    train(config, run_dir)
    _, cfg, params, _ = load_model(run_dir)
    batches = data_lib.make_iterator(config, "eval", batch_size=config.train.batch_size, seed=0)
    ev = eval_lib.evaluate(cfg, params, batches, jax.random.key(seed), prior_samples=2,
                           max_batches=_EVAL_BATCHES.value)

    rng = np.random.default_rng(1000 + seed)
    letters = rng.choice(26, _PROMPTS.value, replace=False)
    rows, groups, layout = [], [], []
    gid = 0
    for p, letter in enumerate(letters):
        prompt = [int(letter), synthetic.PROMPT_SEP]
        for g in range(1 + _SHARED.value):  # group 0: independent Z; then shared-Z groups
            layout.append((p, g, len(rows)))
            for _ in range(_GROUP.value):
                rows.append(prompt)
                groups.append(gid if g else 10_000 + len(rows))
            gid += 1
    sc = SamplingConfig(max_new_tokens=synthetic.BODY_LEN, temperature=_TEMPERATURE.value)
    out = generate(cfg, params, rows, sc, z_key=jax.random.key(2000 + seed),
                   token_key=jax.random.key(3000 + seed), z_groups=groups, prompt_z=_PROMPT_Z.value)
    texts = [synthetic.decode(list(r) + list(n)) for r, n in zip(rows, out["new_tokens"])]
    by_group = {(p, g): texts[i:i + _GROUP.value] for p, g, i in layout}
    shared = [v for (p, g), v in by_group.items() if g]
    indep = [v for (p, g), v in by_group.items() if not g]
    metrics = {
        "pos_agree_shared": sm.mean_or_none(sm.position_agreement(s) for s in shared),
        "pos_agree_indep": sm.mean_or_none(sm.position_agreement(s) for s in indep),
        "noise_agree_shared": sm.mean_or_none(sm.noise_agreement(s) for s in shared),
        "noise_agree_indep": sm.mean_or_none(sm.noise_agreement(s) for s in indep),
        "validity": sm.validity(texts),
        "kl_bits": ev.get("kl_bits", 0.0),
        "ce_posterior": ev.get("ce_posterior", ev.get("ce")),
        "ce_prior": ev.get("ce_prior", ev.get("ce")),
        **probe(cfg, params, config, seed),
    }
    return metrics, {f"{p}/{g}": v for (p, g), v in by_group.items()}


def fmt(x, std=None):
    if x is None:
        return "n/a"
    return f"{x:.3f}" if std is None else f"{x:.3f} ± {std:.3f}"


def write_table(outdir, summary, checks=()):
    def rows(metrics):
        return [f"| {name} | " + " | ".join(fmt(s[m]["mean"], s[m]["std"]) for m in metrics) + " |"
                for name, s in summary.items()]

    lines = ["| model | pos. agreement shared Z | pos. agreement indep. Z | `!` overlap shared Z "
             "| `!` overlap indep. Z | validity | KL bits/token | CE posterior | CE prior |",
             "|---|---|---|---|---|---|---|---|---|", *rows(METRICS)]
    lines += ["", "What Z encodes: the posterior's cross-entropy (nats) on each kind of target, "
              "validation records. Without Z a `!` costs ln 16 = 2.773 nats wherever it is; a "
              "model that knows the noise from Z drives it toward 0.", "",
              "The last two columns: the largest |correlation| over the latent bits between a bit's "
              "posterior probability at t and whether the target at t is a `!`, or lies before the "
              "run.", "",
              "| model | CE on `!` targets | CE on letter targets | CE on `_` targets "
              "| bit vs `!` | bit vs before-run |",
              "|---|---|---|---|---|---|", *rows(PROBE)]
    if checks:
        lines += ["", "The paper's ordering (seed means; thresholds in `synthetic_metrics.py`):", ""]
        lines += [f"- {'PASS' if c['ok'] else 'FAIL'}: {c['check']}: {c['detail']}" for c in checks]
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def draw_figure(path, samples, n_groups=3):
    """Rows of generated sequences per group, one panel per model (seed 0, first prompt):
    prompt letter blue, other letters orange, '!' black, '_' white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["white", "#1f5fbf", "#f08c00", "black", "#bbbbbb"])
    names = list(samples)
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 2.4 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        groups = [samples[name][k] for k in sorted(samples[name]) if k.startswith("0/")][:n_groups]
        rows = []
        for gi, grp in enumerate(groups):
            for seq in grp:
                letter = seq[0]
                rows.append([0 if c == "_" else 1 if c == letter else 3 if c == "!" else
                             4 if c == ">" else 2 for c in seq[:66]])
            if gi < len(groups) - 1:
                rows.append([0] * 66)
        ax.imshow(np.array(rows), cmap=cmap, vmin=0, vmax=4, aspect="auto", interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([0, 2, 18, 34, 50, 65])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=11)
        ax.set_title("independent Z  |  shared Z  |  shared Z   (groups top to bottom)", fontsize=8,
                     loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import numpy as np
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    outdir = _OUTDIR.value
    os.makedirs(outdir, exist_ok=True)
    kappas = [float(fractions.Fraction(k)) for k in _KAPPAS.value]
    models = ([None] if _BASELINE.value else []) + kappas
    seeds = [int(s) for s in _SEEDS.value]
    runs, samples = {}, {}
    total, t0 = len(models) * len(seeds), time.perf_counter()
    for i, (seed, kappa) in enumerate((s, k) for s in seeds for k in models):
        name = kappa_name(kappa)
        elapsed = time.perf_counter() - t0
        eta = f", ETA {elapsed / i * (total - i) / 60:.0f} min" if i else ""
        print(f"[{i + 1}/{total}] {name}, seed {seed}{eta}", flush=True)
        run_dir = os.path.join(outdir, "runs", f"{name.replace('/', '_').replace(' ', '_')}_seed{seed}")
        done = os.path.join(run_dir, "sweep_result.json")
        if os.path.exists(done):  # finished in an earlier invocation: the sweep resumes
            with open(done) as f:
                metrics, groups = json.load(f)
        else:
            metrics, groups = run_model(_CONFIG.value, kappa, seed, run_dir)
        if any(m not in metrics for m in PROBE):  # finished before the probe existed
            from free_transformer_jax.checkpoint import load_model

            config, cfg, params, _ = load_model(run_dir)
            metrics.update(probe(cfg, params, config, seed))
        with open(done, "w") as f:
            json.dump([metrics, groups], f)
        runs[f"{name}/seed{seed}"] = metrics
        if seed == seeds[0]:
            samples[name] = groups
        print("    " + ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items()), flush=True)

    summary = {}
    for kappa in models:
        name = kappa_name(kappa)
        per_seed = [runs[f"{name}/seed{s}"] for s in seeds]
        summary[name] = {}
        for m in METRICS + PROBE:
            vals = [r[m] for r in per_seed if r[m] is not None]
            summary[name][m] = {"mean": float(np.mean(vals)) if vals else None,
                                "std": float(np.std(vals)) if vals else None, "per_seed": [r[m] for r in per_seed]}
    from free_transformer_jax import synthetic_metrics as sm

    checks = sm.paper_ordering({k: {m: v["mean"] for m, v in summary[kappa_name(k)].items()}
                                for k in models})
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"summary": summary, "runs": runs, "samples": samples, "seeds": seeds,
                   "kappas_bits": kappas, "prompts": _PROMPTS.value, "shared_groups": _SHARED.value,
                   "group_size": _GROUP.value, "checks": checks,
                   "config": _CONFIG.value.to_dict()}, f, indent=1)
    print(write_table(outdir, summary, checks))
    draw_figure(os.path.join(outdir, "figure.png"), samples)
    print(f"wrote {outdir}/results.json, results.md, figure.png "
          f"({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    run(main)
