"""The paper's synthetic experiment (Figures 3-4): train a kappa sweep plus the baseline, then
generate groups with independent and with shared Z and measure what Z learned, with bootstrap
intervals.

    python launch/synthetic_sweep.py --outdir=outputs/synthetic_sweep

For each kappa in --kappas (bits per token) and the baseline, for each seed: train
configs/synthetic.py (resuming if the run exists), evaluate KL/CE/ELBO, probe the posterior, then
for --prompts random prompts generate one group with independent Z and --shared_groups groups with
one shared Z (each --group_size sequences). Writes results.json (every generated sample of every
seed), results.md and figure.png into --outdir. Interrupted? Run the same command again: finished
models are read back, a model in training resumes from its last checkpoint (a run directory
refuses to resume under a different training config). Runs on whatever JAX
platform is present (CPU or GPU).

    python launch/synthetic_sweep.py --rescore=docs/synthetic_sweep_first/results.json \
        --outdir=docs/synthetic_sweep_first

re-analyses a stored results.json (this format, or the first sweep's) with the current metrics
and statistics, without training.
"""

import fractions
import json
import math
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from free_transformer_jax import hostmem
from common import run  # launch/common.py: one-line errors shared by the launchers

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Base config.",
                                          lock_config=True)
_OUTDIR = flags.DEFINE_string("outdir", "outputs/synthetic_sweep", "Runs, tables and the figure.")
_KAPPAS = flags.DEFINE_list("kappas", ["0.015625", "0.125", "1", "8"], "kappa in bits per token.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_BASELINE = flags.DEFINE_bool("baseline", True, "Also train the baseline (latent off).")
_LATENT_BITS_FOR = flags.DEFINE_list(
    "latent_bits_for", ["8:12"],
    "kappa:H pairs overriding config.model.latent_bits for that kappa. The KL of H bits never "
    "exceeds H bits, so a kappa >= H leaves the model with no KL term (its rows are labelled so).")
_CODE_CHUNK = flags.DEFINE_integer(
    "code_chunk", 4096, "config.model.latent_code_chunk for models with more codes than this "
    "(the fused backward then never holds a tokens x 2^H tensor whole; H = 16 stays affordable).")
_PROMPTS = flags.DEFINE_integer("prompts", 12, "Random prompts per model.")
_SHARED = flags.DEFINE_integer("shared_groups", 3, "Shared-Z groups per prompt.")
_GROUP = flags.DEFINE_integer("group_size", 8, "Sequences per group.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Token sampling temperature.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 4, "Validation batches for KL/CE.")
_PROMPT_Z = flags.DEFINE_enum("prompt_z", "prior", ["prior", "encoder"],
                              "Z of the 2-token prompt: uniform like the rest of Z_1..Z_T (the "
                              "paper's 'Z sampled' groups), or sampled from the encoder run on the "
                              "prompt alone (the general prefill protocol).")
_GROUP_Z = flags.DEFINE_enum(
    "group_z", "prior", ["prior", "posterior", "aggregate"],
    "Where each group's Z comes from. prior: uniform, the paper's generation. posterior: a "
    "diagnostic, not generation from the model: each shared group's Z (and each independent row's) "
    "is the encoder's posterior sample on a fresh record with the prompt's letter, the Z the "
    "decoder was trained with; results.md then also says how often a sample's target and `!` "
    "match that record's. aggregate: Z_t drawn independently per position from the posterior "
    "averaged over 512 validation records (a prior fitted to the aggregate posterior's marginals).")
_HOST_MALLOC = hostmem.define_flag()
_RESCORE = flags.DEFINE_string("rescore", "", "Re-analyse this stored results.json (no training).")
_COMPARE = flags.DEFINE_string(
    "compare_to", "", "A stored results.json (e.g. the ablations' base): results.md then also "
    "gives this sweep's differences from it with 95% bootstrap intervals.")
_RUNS_DIR = flags.DEFINE_string(
    "runs_dir", "", "Where the trained models live (default: <outdir>/runs). Sweeps that differ only "
    "in generation settings (--temperature, --prompt_z, --prompts, ...) can share it: each keeps "
    "its own cached samples, and no model is trained twice.")

GEN_COLUMNS = (("pos_agree_shared", "pos. agreement shared Z"), ("pos_agree_indep", "indep. Z"),
               ("pos_excess", "pos. excess"), ("noise_agree_shared", "`!` overlap shared Z"),
               ("noise_agree_indep", "indep. Z"), ("noise_excess", "`!` excess"),
               ("target_rate", "has a target"), ("validity", "validity"))
EVAL_COLUMNS = (("kl_bits", "KL bits/token"), ("ce_posterior", "CE posterior"),
                ("elbo", "ELBO = CE + KL (nats)"), ("ce_prior", "CE prior Z"))
PROBE = (("ce_bang_posterior", "CE on `!` targets"), ("ce_letter_posterior", "CE on letter targets"),
         ("ce_underscore_posterior", "CE on `_` targets"), ("corr_noise", "bit vs `!`"),
         ("corr_start", "bit vs run start"), ("kl_mi_bits", "KL: information"),
         ("kl_aggregate_bits", "KL: aggregate vs prior"),
         ("kl_at_budget", "tokens at the KL budget"), ("kl_above_kappa", "tokens above kappa"))
# probe columns computed from the posterior's bits (none for the baseline; recomputed from the
# checkpoint when a cached run predates them)
BIT_PROBES = ("corr_noise", "corr_start", "kl_mi_bits", "kl_aggregate_bits", "kl_at_budget",
              "kl_above_kappa")
# with --group_z=posterior: how often a sample reproduces the record its Z was encoded from
RECORD_MATCH = (("rec_pos_match", "target at the record's (within 1)"),
                ("rec_pos_match_early", "same, record start 0-18"),
                ("rec_pos_match_mid", "19-37"), ("rec_pos_match_late", "38-56"),
                ("rec_noise_overlap", "`!` overlap with the record"))


def kappa_name(k: float | None) -> str:
    if k is None:
        return "baseline"
    frac = {1 / 64: "1/64", 1 / 8: "1/8", 1 / 4: "1/4", 1 / 2: "1/2"}
    return frac.get(k, f"{k:g}") + " bit"


def model_label(k: float | None, h: int | None) -> str:
    """The row name: kappa, H, and "no KL term" when the KL (at most H bits) cannot exceed kappa."""
    if k is None:
        return "baseline"
    return f"{kappa_name(k)}, H={h}" + (" (no KL term)" if h <= k else "")


def latent_bits_for(overrides: list[str]) -> dict[float, int]:
    out = {}
    for item in overrides:
        try:
            k, h = item.split(":")
            out[float(fractions.Fraction(k))] = int(h)
        except ValueError:
            raise app.UsageError(f"--latent_bits_for={item!r}: expected kappa:H, e.g. 8:16") from None
    return out


def validation_records(config, n_records):
    """The first ``n_records`` records of the evaluation split (SyntheticRecord objects)."""
    from free_transformer_jax.data.sources import open_source

    source = open_source(config, config.data.eval_split, training=False)
    return [source.record(i) for i in range(min(n_records, len(source)))]


def posterior_pass(cfg, params, x_BT, key):
    """(logits, aux) of the model on ``x_BT`` with Z sampled from the encoder's posterior."""
    import jax
    import jax.numpy as jnp

    from free_transformer_jax.model.transformer import FreeTransformer

    apply = jax.jit(lambda p, x, k: FreeTransformer(cfg).apply({"params": p}, x, latent="posterior",
                                                               rngs={"latent": k}))
    return apply(params, jnp.asarray(x_BT), key)


def probe(cfg, params, config, seed, n_records=512):
    """Posterior cross-entropy by kind of target on ``n_records`` validation records (how much Z
    tells the decoder about the noise, `!` targets: ln 16 = 2.773 without Z, and the run, letter
    targets), and :func:`synthetic_metrics.latent_probe` of the posterior's bit probabilities."""
    import jax
    import numpy as np

    from free_transformer_jax import synthetic_metrics as sm

    records = validation_records(config, n_records)
    ids = np.stack([r.ids for r in records])
    logits, aux = posterior_pass(cfg, params, ids[:, :-1], jax.random.key(4000 + seed))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    out = {f"ce_{k}_posterior": v for k, v in sm.ce_by_class(nll, ids[:, 1:]).items()}
    if "bit_logits" not in aux:
        return {**out, **{k: None for k in BIT_PROBES}}
    bits = np.asarray(jax.nn.sigmoid(aux["bit_logits"]))
    corr = sm.latent_probe(bits, ids[:, 1:], np.array([r.start for r in records]))
    split, budget = sm.kl_split(bits), sm.kl_budget(bits, cfg.kappa_bits)
    return {**out, **{f"corr_{k}": v for k, v in corr.items()},
            "kl_mi_bits": split["mi"], "kl_aggregate_bits": split["aggregate"],
            "kl_at_budget": budget["at_budget"], "kl_above_kappa": budget["above"]}


def reprobe(config, seed, run_dir):
    """:func:`probe` of a finished run's final checkpoint (a cached result from before a probe
    column existed)."""
    from free_transformer_jax.checkpoint import load_model

    _, cfg, params, _ = load_model(run_dir)
    return probe(cfg, params, config, seed)


def model_config(base, kappa, h, seed):
    config = base.copy_and_resolve_references()
    with config.unlocked():
        config.train.seed = seed
        config.model.latent = kappa is not None
        if kappa is not None:
            config.model.kappa_bits = kappa
            config.model.latent_bits = h
            if 2 ** h > _CODE_CHUNK.value:
                config.model.latent_code_chunk = _CODE_CHUNK.value
    return config


def run_model(config, seed, run_dir):
    """Train (or resume), evaluate, probe, generate the groups; returns (metrics, groups)."""
    import jax
    import numpy as np

    from free_transformer_jax import data as data_lib
    from free_transformer_jax import evaluate as eval_lib
    from free_transformer_jax.checkpoint import load_model
    from free_transformer_jax.data import synthetic
    from free_transformer_jax.generate import SamplingConfig, generate
    from free_transformer_jax.trainer import train

    train(config, run_dir)
    _, cfg, params, step = load_model(run_dir)
    if step < config.train.steps:  # train() returned early: preempted (SIGTERM) mid-run
        print(f"{run_dir} stopped at step {step} of {config.train.steps} (preempted); rerun the "
              "same command to resume it", flush=True)
        sys.exit(3)
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
    sources, z_codes = None, None
    if _GROUP_Z.value == "posterior" and cfg.latent:
        sources, z_codes = posterior_group_codes(cfg, params, rows, groups, seed)
    elif _GROUP_Z.value == "aggregate" and cfg.latent:
        z_codes = aggregate_group_codes(cfg, params, config, groups, seed)
    out = generate(cfg, params, rows, sc, z_key=jax.random.key(2000 + seed),
                   token_key=jax.random.key(3000 + seed), z_groups=groups, prompt_z=_PROMPT_Z.value,
                   z_codes=z_codes)
    texts = [synthetic.decode(list(r) + list(n)) for r, n in zip(rows, out["new_tokens"])]
    ce = ev.get("ce_posterior", ev.get("ce"))
    metrics = {"kl_bits": ev.get("kl_bits", 0.0), "ce_posterior": ce,
               "elbo": ev.get("elbo", ce), "ce_prior": ev.get("ce_prior", ce),
               **probe(cfg, params, config, seed)}
    if sources is not None:
        metrics.update(record_match(texts, sources))
        metrics["z_records"] = {f"{p}/{g}": sources[i:i + _GROUP.value] for p, g, i in layout}
    return metrics, {f"{p}/{g}": texts[i:i + _GROUP.value] for p, g, i in layout}


def rows_of_group_codes(codes_by_group, groups):
    """(rows, 66) int32 codes for ``generate(z_codes=...)``: each row its group's Z for input
    positions 0..64, plus the last slot, which is never fed."""
    import numpy as np

    codes = np.stack([codes_by_group[g] for g in groups])
    return np.concatenate([codes, codes[:, -1:]], axis=1).astype(np.int32)


def posterior_group_codes(cfg, params, rows, groups, seed):
    """For --group_z=posterior: one fresh record per Z group (the prompt's letter, a uniform start,
    the data's noise), encoded by the model's encoder with Z sampled from its posterior. Returns
    each row's record text and its codes (:func:`rows_of_group_codes`)."""
    import jax
    import numpy as np

    from free_transformer_jax.data import synthetic

    rng = np.random.default_rng(5000 + seed)
    ids = sorted(set(groups))
    letter_of = {g: int(rows[groups.index(g)][0]) for g in ids}
    records = {g: synthetic.make_record(letter_of[g], int(rng.integers(0, synthetic.MAX_START + 1)),
                                        rng.random(synthetic.BODY_LEN) < synthetic.NOISE_PROB)
               for g in ids}
    _, aux = posterior_pass(cfg, params, np.stack([records[g].ids[:-1] for g in ids]),
                            jax.random.key(6000 + seed))
    codes = np.asarray(aux["codes"])
    return ([records[g].text for g in groups],
            rows_of_group_codes({g: codes[i] for i, g in enumerate(ids)}, groups))


def aggregate_group_codes(cfg, params, config, groups, seed, n_records=512):
    """For --group_z=aggregate: q_t, the encoder's posterior over the 2**H codes averaged over
    ``n_records`` validation records at each position t, then one Z per group with each Z_t drawn
    independently from q_t. Returns the rows' codes (:func:`rows_of_group_codes`)."""
    import jax
    import numpy as np

    from free_transformer_jax.model import latent as latent_lib

    x = np.stack([r.ids[:-1] for r in validation_records(config, n_records)])
    _, aux = posterior_pass(cfg, params, x, jax.random.key(7000 + seed))
    q = np.asarray(latent_lib.aggregate_posterior(aux["bit_logits"]), np.float64)  # (T, C)
    q /= q.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(8000 + seed)
    return rows_of_group_codes({g: np.array([rng.choice(cfg.num_codes, p=q_t) for q_t in q])
                                for g in sorted(set(groups))}, groups)


def record_match(texts, sources):
    """Mean over samples: target within 1 of its Z record's target, and the Jaccard overlap of the
    two `!` sets (a sample without a target, or whose record has none, matches nothing)."""
    import numpy as np

    from free_transformer_jax import synthetic_metrics as sm

    pos, noise, by_third = [], [], {"early": [], "mid": [], "late": []}
    for t, src in zip(texts, sources):
        a, b = sm.target_position(t), sm.target_position(src)
        hit = a is not None and b is not None and abs(a - b) <= 1
        pos.append(hit)
        if b is not None:  # thirds of the start range 0..56: how early Z must decide
            by_third[("early", "mid", "late")[min(b // 19, 2)]].append(hit)
        na, nb = sm.noise_positions(t), sm.noise_positions(src)
        if na | nb:
            noise.append(len(na & nb) / len(na | nb))
    return {"rec_pos_match": float(np.mean(pos)),
            **{f"rec_pos_match_{k}": float(np.mean(v)) if v else None for k, v in by_third.items()},
            "rec_noise_overlap": float(np.mean(noise)) if noise else None}


# Fields that change neither the trained model nor its samples (logging, chunking, the mesh), so a
# run may resume under other values.
_BOOKKEEPING = ("train.log_every", "train.ckpt_every", "train.keep_ckpts", "train.async_ckpt",
                "train.eval_every", "train.profile_steps", "data.num_workers", "data.prefetch",
                "data.read_threads", "data.read_buffer", "model.latent_code_chunk",
                "model.latent_token_chunk", "model.attention_chunk", "model.remat_policy", "mesh.*")

# what only the latent path reads: a baseline is the same model whatever they are, so sweeps that
# ablate them (--runs_dir of their own, the baseline's run linked in) share one baseline
_LATENT_ONLY = tuple(f"model.{k}" for k in (
    "latent_bits", "kappa_bits", "kl_weight", "free_bits_scope", "aggregate_kl_weight",
    "aggregate_kl_ramp_steps", "aggregate_kl_form", "latent_impl", "encoder_abs_pos"))


def check_run_config(run_dir, config):
    """A run directory holds one training setup: refuse to resume it under another config (the
    trainer writes config.json there), naming the fields that differ. A field added to the code
    after the run was trained reads as its default (``configlib.resume_changes``); a baseline's
    run ignores the fields only the latent path reads."""
    from free_transformer_jax import configlib

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        diff = configlib.resume_changes(json.load(f), config.to_dict(), mutable=_BOOKKEEPING + (
            () if config.model.latent else _LATENT_ONLY))
    if diff:
        raise app.UsageError(f"{run_dir} was trained with other values ({'; '.join(diff)}); use "
                             "another --outdir/--runs_dir for this setup")


def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


# Report ---------------------------------------------------------------------------------------------
def analyse(models, stream=0):
    """Bootstrap estimates per model (``synthetic_metrics.analyse_model``) and the checks. Every
    model, and every sweep compared with another (``stream``), draws its own random stream."""
    from free_transformer_jax import synthetic_metrics as sm

    analyses = {}
    for i, (name, m) in enumerate(models.items()):
        analyses[name] = sm.analyse_model({int(s): g for s, g in m["samples"].items()},
                                          {int(s): r for s, r in m["runs"].items()},
                                          seed=1000 * stream + i)
    by_kappa = {m["kappa_bits"]: analyses[name] for name, m in models.items()}
    bits = {m["kappa_bits"]: m["latent_bits"] for m in models.values() if m["kappa_bits"] is not None}
    return analyses, sm.paper_ordering(by_kappa, bits)


def write_table(outdir, models, analyses, checks, provenance):
    from free_transformer_jax import synthetic_metrics as sm

    def label(name):
        m = models[name]
        return model_label(m["kappa_bits"], m["latent_bits"])

    def seeds(name, key):
        return ",".join(str(s) for s in sorted(models[name][key], key=int)) or "none"

    goals = [c for c in checks if c["kind"] == "goal"]
    missed = [c["check"] for c in goals if not c["ok"]]
    if goals:
        provenance = [*provenance, "", f"Goals met: {len(goals) - len(missed)} of {len(goals)}"
                      + (f"; not met: {'; '.join(missed)}." if missed else ".")]
    def boot_table(columns, source: str) -> list[str]:
        """A markdown table: one row per model, each column a metric's bootstrap summary."""
        return (["| model | seeds | " + " | ".join(c for _, c in columns) + " |",
                 "|---|---|" + "---|" * len(columns)]
                + [f"| {label(name)} | {seeds(name, source)} | "
                   + " | ".join(sm.fmt_boot(a["all"].get(m)) for m, _ in columns) + " |"
                   for name, a in analyses.items()])

    lines = [*provenance, "",
             "Every `a ± b` is the seed mean ± its bootstrap standard error: replicates resample "
             "the seeds, then the Z groups within each seed (a group's sequences share a prompt "
             "and, for shared Z, one Z, so they are not independent samples). Checks use 95% "
             "percentile intervals of the same bootstrap; a difference between two models is "
             "paired (both draw the same seeds and groups: every model of a seed shares its "
             "prompts and sampling keys, and its training seed's data order). Target position = start of the 8-window "
             "of the prompt letter and `!` holding at least 3 consecutive letters (most letters, "
             "leftmost); a sequence with no such window agrees with nothing. Each excess = shared "
             "minus independent Z, resampled together within a seed.", "",
             *boot_table(GEN_COLUMNS, "samples")]
    lines += ["", "Likelihoods on validation batches (per token; the spread is over seeds only). "
              "CE posterior uses the encoder's Z and is not comparable to the baseline's CE; the "
              "ELBO (CE posterior + KL) bounds -log p and is; CE prior draws Z uniformly as in "
              "generation.", "", *boot_table(EVAL_COLUMNS, "runs")]
    lines += ["", "What Z encodes (512 validation records; seed mean, then each seed). CE in nats "
              "by kind of target: without Z a `!` costs ln 16 = 2.773 wherever it is. bit vs "
              "X: the largest, over the latent bits, of the |correlation| between the bit's "
              "posterior probability and the fact, computed within each position across records "
              "and averaged over positions (a bit that depends on the position alone scores 0; "
              "one independent of the fact about 0.035). KL: the posterior's KL per token "
              "(bits, over positions) = information + aggregate vs prior, exactly: information "
              "is the mutual information between Z_t and the record, aggregate vs prior the KL "
              "of the posterior averaged over records from the uniform prior, a departure prior "
              "samples never reproduce (synthetic_metrics.kl_split). Tokens at the KL budget: "
              f"fraction of (record, position) whose KL is at least {sm.BUDGET_NEAR:g} kappa; "
              "above kappa: where the free-bits hinge charges (synthetic_metrics.kl_budget).", "",
              "| model | " + " | ".join(c for _, c in PROBE) + " |", "|---|" + "---|" * len(PROBE)]
    for name, m in models.items():
        cells = []
        for key, _ in PROBE:
            vals = [m["runs"][s].get(key) for s in sorted(m["runs"], key=int)]
            if m["kappa_bits"] is None and key in BIT_PROBES:
                cells.append("n/a")
            elif not vals or any(v is None for v in vals):
                cells.append("not recomputed" if key in BIT_PROBES else "n/a")
            else:
                cells.append(f"{sum(vals) / len(vals):.3f} ({', '.join(f'{v:.3f}' for v in vals)})")
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    matched = {n: m for n, m in models.items()
               if any("rec_pos_match" in r for r in m["runs"].values())}
    if matched:
        lines += ["", "Z from the posterior (--group_z=posterior, a diagnostic): every group's Z is "
                  "the encoder's sample on a fresh record with the prompt's letter, so the "
                  "agreements above measure how well the decoder follows the Z it was trained on, "
                  "not generation from the prior. Per sample (seed mean, then each seed); chance "
                  "for the target is about 3/57 = 0.05:", "",
                  "| model | " + " | ".join(c for _, c in RECORD_MATCH) + " |",
                  "|---|" + "---|" * len(RECORD_MATCH)]
        for name, m in matched.items():
            cells = []
            for key, _ in RECORD_MATCH:
                vals = [m["runs"][s].get(key) for s in sorted(m["runs"], key=int)]
                vals = [v for v in vals if v is not None]
                cells.append(f"{sum(vals) / len(vals):.3f} ({', '.join(f'{v:.3f}' for v in vals)})"
                             if vals else "n/a")
            lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    old = {n: m for n, m in models.items() if any("old_metrics" in r for r in m["runs"].values())}
    if old:
        lines += ["", "As recorded by the first sweep, per seed (old definitions: target = first "
                  "occurrence of the letter, validity without the 3-letter run; only seed "
                  f"{seeds(next(iter(old)), 'samples')}'s samples were stored, so the other seeds "
                  "cannot be re-scored):", "",
                  "| model | " + " | ".join(f"{c} (old)" for _, c in (GEN_COLUMNS[0], GEN_COLUMNS[1],
                                                                   GEN_COLUMNS[3], GEN_COLUMNS[4],
                                                                   GEN_COLUMNS[7])) + " |",
                  "|---|---|---|---|---|---|"]
        for name, m in old.items():
            cells = []
            for key in ("pos_agree_shared", "pos_agree_indep", "noise_agree_shared",
                        "noise_agree_indep", "validity"):
                cells.append(" / ".join(f"{m['runs'][s]['old_metrics'][key]:.3f}"
                                        for s in sorted(m["runs"], key=int)))
            lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    for kind, title in (("ordering", "The paper's ordering"),
                        ("goal", "The strength the paper's Figure 4 shows (the targets of the re-run)")):
        sel = [c for c in checks if c["kind"] == kind]
        if sel:
            lines += ["", f"{title} (95% bootstrap intervals; thresholds in `synthetic_metrics.py`):", ""]
            lines += [f"- {'PASS' if c['ok'] else 'FAIL'}: {c['check']}: {c['detail']}" for c in sel]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write(text)
    return text


def draw_figure(path, models, analyses, prompt="0"):
    """The paper's layout: per model one row, three panels (the first prompt's independent-Z group
    and two shared-Z groups, first seed with samples); the target (the window the position metric
    counts) blue, other prompt letters light blue, `!` black, `_` white, other letters orange. The
    bottom panel: shared- and independent-Z position agreement and `!` overlap with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    from free_transformer_jax import synthetic_metrics as sm

    cmap = ListedColormap(["white", "#1f5fbf", "#9ecae1", "black", "#bbbbbb", "#f08c00"])

    def colours(seq):
        start = sm.target_position(seq)
        row = []
        for i, c in enumerate(seq[:66]):
            j = i - sm.PROMPT
            if i < sm.PROMPT:
                row.append(4)
            elif c == "_":
                row.append(0)
            elif c == "!":
                row.append(3)
            elif c == seq[0]:
                row.append(1 if start is not None and start <= j < start + sm.RUN else 2)
            else:
                row.append(5)
        return row + [0] * (66 - len(row))

    names = list(models)
    fig = plt.figure(figsize=(13, 1.9 * len(names) + 3.2))
    grid = fig.add_gridspec(len(names) + 1, 3, height_ratios=[1] * len(names) + [1.6], hspace=0.6)
    for r, name in enumerate(names):
        m, a = models[name], analyses[name]["all"]
        seeds = sorted(m["samples"], key=int)
        label = model_label(m["kappa_bits"], m["latent_bits"])
        if not seeds:
            continue
        groups = m["samples"][seeds[0]]
        keys = [f"{prompt}/{g}" for g in range(3) if f"{prompt}/{g}" in groups]
        for c, key in enumerate(keys):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(np.array([colours(s) for s in groups[key]]), cmap=cmap, vmin=0, vmax=5,
                      aspect="auto", interpolation="nearest")
            ax.set_yticks([])
            ax.set_xticks([2, 34, 65])
            ax.tick_params(labelsize=7)
            ax.set_title(("independent Z" if key.endswith("/0") else "shared Z")
                         + (f"   [{label}, seed {seeds[0]}]" if c == 0 else ""), fontsize=8, loc="left")
        pos, noise = a.get("pos_agree_shared"), a.get("noise_agree_shared")
        pi, ni = a.get("pos_agree_indep"), a.get("noise_agree_indep")
        fig.text(0.91, 1 - (r + 0.5) / (len(names) + 1.6), "mean ± s.e.\nposition agreement\nshared "
                 f"{sm.fmt_boot(pos)}\nindep. {sm.fmt_boot(pi)}\n'!' overlap\nshared {sm.fmt_boot(noise)}"
                 f"\nindep. {sm.fmt_boot(ni)}", fontsize=6.5, va="center")
    ax = fig.add_subplot(grid[len(names), :])
    x = np.arange(len(names))
    for off, metric, lab, col in ((-0.15, "pos_agree_shared", "position, shared Z", "#1f5fbf"),
                                  (-0.05, "pos_agree_indep", "position, indep. Z", "#9ecae1"),
                                  (0.05, "noise_agree_shared", "'!' overlap, shared Z", "black"),
                                  (0.15, "noise_agree_indep", "'!' overlap, indep. Z", "#888888")):
        pts = [(i, analyses[n]["all"].get(metric)) for i, n in enumerate(names)]
        pts = [(i, b) for i, b in pts if b is not None]
        if pts:
            lo_hi = np.array([b.interval() for _, b in pts])
            mid = np.array([b.point for _, b in pts])
            ax.errorbar([i + off for i, _ in pts], mid, yerr=[mid - lo_hi[:, 0], lo_hi[:, 1] - mid],
                        fmt="o", color=col, label=lab, capsize=3, ms=4)
    ax.set_xticks(x, [model_label(models[n]["kappa_bits"], models[n]["latent_bits"]) for n in names],
                  fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("agreement", fontsize=8)
    ax.set_title("seed means with 95% bootstrap intervals (seeds, then Z groups within a seed)",
                 fontsize=8, loc="left")
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    height = fig.get_figheight()  # margins in inches, so a one-model figure keeps its titles
    fig.subplots_adjust(left=0.05, right=0.9, top=1 - 0.4 / height, bottom=0.3 / height)
    fig.savefig(path, dpi=100)
    plt.close(fig)


COMPARED = ("pos_agree_shared", "pos_excess", "noise_excess", "target_rate", "validity")


def compare_lines(models, analyses, reference):
    """results.md lines: this sweep minus the sweep stored at ``reference`` (an ablation against
    its base), per model both have, with 95% intervals of the difference."""
    from free_transformer_jax import synthetic_metrics as sm

    ref_models, _ = load_stored(reference)
    ref, _ = analyse(ref_models, stream=1)
    lines = ["", f"Against `{reference}` (this sweep minus that one; 95% interval of the difference, "
             "paired when both have the same seeds and prompts: the same seeds and Z groups are "
             "drawn for both; 0 outside it = the change moved the metric):", "",
             "| model | " + " | ".join(dict(GEN_COLUMNS).get(m, m) for m in COMPARED) + " |",
             "|---|" + "---|" * len(COMPARED)]
    for name in analyses:
        if name in ref:
            cells = []
            for m in COMPARED:
                d = sm.difference(analyses[name], ref[name], m)
                cells.append("n/a" if d is None else sm.fmt_boot(d, interval=True))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report(outdir, models, settings, provenance, reference=""):
    """Analyse ``models`` and write results.json, results.md and figure.png into ``outdir``; with
    ``reference`` (a stored results.json), also the differences against it."""
    analyses, checks = analyse(models)
    if reference and not os.path.exists(reference):  # e.g. the base of an ablation still training
        print(f"--compare_to={reference}: no such file yet, so results.md has no comparison; run "
              "the same command again once it exists (nothing is trained again)", flush=True)
    elif reference:
        provenance = [*provenance, *compare_lines(models, analyses, reference)]
    summary = {name: {"all": {m: b.to_dict() for m, b in a["all"].items()},
                      "per_seed": {str(s): {m: b.to_dict() for m, b in r.items()}
                                   for s, r in a["per_seed"].items()}}
               for name, a in analyses.items()}
    tmp = os.path.join(outdir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"version": 2, **settings, "models": models, "summary": summary, "checks": checks},
                  f, indent=1)
    os.replace(tmp, os.path.join(outdir, "results.json"))
    text = write_table(outdir, models, analyses, checks, provenance)
    draw_figure(os.path.join(outdir, "figure.png"), models, analyses)
    return text


def load_stored(path):
    """(models, settings) from a results.json: this script's format, or the first sweep's (samples
    of the first seed only, no ELBO, the old probe; its generation metrics kept as
    ``old_metrics``)."""
    with open(path) as f:
        d = json.load(f)
    if d.get("version") == 2:
        skip = ("version", "models", "summary", "checks")
        return d["models"], {k: v for k, v in d.items() if k not in skip}
    h = d["config"]["model"]["latent_bits"]
    models = {}
    for k in [None] + d["kappas_bits"]:
        name = kappa_name(k)
        runs = {}
        for s in d["seeds"]:
            r = d["runs"][f"{name}/seed{s}"]
            kl_nats = r["kl_bits"] * math.log(2.0)
            runs[str(s)] = {"kl_bits": r["kl_bits"], "ce_posterior": r["ce_posterior"],
                            "elbo": r["ce_posterior"] + kl_nats, "ce_prior": r["ce_prior"],
                            **{key: r.get(key) for key, _ in PROBE if key.startswith("ce_")},
                            **{key: None for key in BIT_PROBES},
                            "old_metrics": {m: r[m] for m in ("pos_agree_shared", "pos_agree_indep",
                                                              "noise_agree_shared", "noise_agree_indep",
                                                              "validity")}}
        models[name] = {"kappa_bits": k, "latent_bits": None if k is None else h,
                        "samples": {str(d["seeds"][0]): d["samples"][name]}, "runs": runs}
    settings = {"seeds": d["seeds"], "kappas_bits": d["kappas_bits"], "prompts": d["prompts"],
                "shared_groups": d["shared_groups"], "group_size": d["group_size"],
                "config": d["config"],
                "rescored_from": f"the first sweep's stored results ({path}, "
                                 f"{d['config']['train']['steps']} steps, seeds "
                                 f"{', '.join(map(str, d['seeds']))}, H = {h} for every kappa)"}
    return models, settings


def provenance_lines(models, settings, rescored):
    steps = settings["config"]["train"]["steps"]
    hs = sorted({m["latent_bits"] for m in models.values() if m["latent_bits"] is not None})
    gen = sorted({s for m in models.values() for s in m["samples"]}, key=int)
    ev = sorted({s for m in models.values() for s in m["runs"]}, key=int)
    lines = [f"# Synthetic sweep: {len(ev)} seed{'s' * (len(ev) != 1)}, {steps} steps, "
             f"H = {'/'.join(map(str, hs))}", ""]
    if settings.get("group_z") == "aggregate":
        lines.append("**Diagnostic, not the paper's generation**: every group's Z_t was drawn from "
                     "the encoder's posterior averaged over 512 validation records at position t "
                     "(--group_z=aggregate, a prior fitted to the aggregate posterior's marginals), "
                     "not from the uniform prior.")
    if settings.get("group_z") == "posterior":
        lines.append("**Diagnostic, not the paper's generation**: every group's Z was sampled from "
                     "the encoder's posterior on a fresh record (--group_z=posterior), not from the "
                     "uniform prior, so the checks below say how well the decoder follows a Z of "
                     "the kind it was trained on.")
    if rescored:
        lines.append(f"**Re-scored, not re-run**: {settings.get('rescored_from', 'a stored run')} "
                     "analysed again with the current metrics and statistics; no model was trained.")
    lines.append(f"Generation metrics from seed(s) {', '.join(gen)} (the seeds whose samples are "
                 f"stored); likelihoods from seed(s) {', '.join(ev)}.")
    short = []
    if len(ev) < 3:
        short.append(f"{len(ev)} seed{'s' * (len(ev) != 1)}, not the 3 per kappa the protocol asks")
    if len(gen) < len(ev):
        short.append("the generation intervals cover Z-group sampling within one seed only, not "
                     "the seed-to-seed spread (large at 1 bit: see the old per-seed table)")
    for m in models.values():
        if m["kappa_bits"] is not None and m["latent_bits"] <= m["kappa_bits"]:
            short.append(f"the {kappa_name(m['kappa_bits'])} model has H = {m['latent_bits']}, so "
                         "its KL term never binds (no KL term)")
    if any(r.get(key) is None for m in models.values() if m["kappa_bits"] is not None
           for r in m["runs"].values() for key in BIT_PROBES):
        short.append("the posterior probes (bit vs `!` / run start, the KL split) are not all "
                     "recomputed (they need the checkpoints, which are not stored)")
    if short:
        lines += ["", "Limits of this run: " + "; ".join(short) + "."]
    return lines


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from free_transformer_jax.logs import setup_console_logging

    setup_console_logging()  # Orbax/Grain INFO chatter needs -v=1
    logging.info("%s", hostmem.configure(_HOST_MALLOC.value))  # before JAX starts its backend
    outdir = _OUTDIR.value
    os.makedirs(outdir, exist_ok=True)
    if _RESCORE.value and not os.path.exists(_RESCORE.value):
        raise app.UsageError(f"--rescore={_RESCORE.value}: no such file")
    if _RESCORE.value:
        models, settings = load_stored(_RESCORE.value)
        settings.setdefault("rescored_from", _RESCORE.value)
        print(report(outdir, models, settings, provenance_lines(models, settings, rescored=True),
                     _COMPARE.value))
        return

    base = _CONFIG.value
    kappas = [float(fractions.Fraction(k)) for k in _KAPPAS.value]
    overrides = latent_bits_for(_LATENT_BITS_FOR.value)
    specs = ([(None, None)] if _BASELINE.value else []) + [
        (k, overrides.get(k, base.model.latent_bits)) for k in kappas]
    seeds = [int(s) for s in _SEEDS.value]
    models = {kappa_name(k): {"kappa_bits": k, "latent_bits": h, "samples": {}, "runs": {}}
              for k, h in specs}
    total, t0 = len(specs) * len(seeds), time.perf_counter()
    runs_dir = _RUNS_DIR.value or os.path.join(outdir, "runs")
    gen_tag = (f"{_PROMPT_Z.value}_T{_TEMPERATURE.value:g}_{_PROMPTS.value}x{1 + _SHARED.value}"
               f"x{_GROUP.value}_E{_EVAL_BATCHES.value}"
               + ("" if _GROUP_Z.value == "prior" else f"_Z{_GROUP_Z.value}"))
    for i, (seed, (kappa, h)) in enumerate((s, spec) for s in seeds for spec in specs):
        name = kappa_name(kappa)
        elapsed = time.perf_counter() - t0
        eta = f", ETA {elapsed / i * (total - i) / 60:.0f} min" if i else ""
        print(f"[{i + 1}/{total}] {model_label(kappa, h)}, seed {seed}{eta}", flush=True)
        slug = name.replace("/", "_").replace(" ", "_") + ("" if kappa is None else f"_H{h}")
        run_dir = os.path.abspath(os.path.join(runs_dir, f"{slug}_seed{seed}"))
        done = os.path.join(run_dir, f"sweep_result_{gen_tag}.json")
        config = model_config(base, kappa, h, seed)
        check_run_config(run_dir, config)
        if os.path.exists(done):  # finished in an earlier invocation: the sweep resumes
            with open(done) as f:
                result = json.load(f)
            if kappa is not None and any(k not in result["metrics"] for k in BIT_PROBES):
                result["metrics"].update(reprobe(config, seed, run_dir))  # a newer probe
                with open(done, "w") as f:
                    json.dump(result, f)
        else:
            metrics, groups = run_model(config, seed, run_dir)
            result = {"version": 2, "metrics": metrics, "groups": groups}
            with open(done, "w") as f:
                json.dump(result, f)
        models[name]["runs"][str(seed)] = result["metrics"]
        models[name]["samples"][str(seed)] = result["groups"]
        print("    " + ", ".join(f"{k} {fmt(v)}" for k, v in result["metrics"].items()
                              if not isinstance(v, dict)), flush=True)

    settings = {"seeds": seeds, "kappas_bits": kappas, "prompts": _PROMPTS.value,
                "shared_groups": _SHARED.value, "group_size": _GROUP.value,
                "temperature": _TEMPERATURE.value, "prompt_z": _PROMPT_Z.value,
                "group_z": _GROUP_Z.value,
                "config": base.to_dict()}
    print(report(outdir, models, settings, provenance_lines(models, settings, rescored=False),
                 _COMPARE.value))
    print(f"wrote {outdir}/results.json, results.md, figure.png "
          f"({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    run(main)
