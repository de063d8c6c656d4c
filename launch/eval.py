"""Evaluate a checkpoint: honest per-token likelihoods on a data split, and/or continuation
scoring on a multiple-choice JSONL task.

    python launch/eval.py --workdir=/tmp/ft_demo
    python launch/eval.py --workdir=/tmp/ft_demo --choice_task=data/tasks/synthetic_choice.jsonl
    python launch/eval.py --workdir=gs://bucket/run1 --mesh_tensor=4    # 8B: FSDP x tensor

Free Transformer: ce_posterior, kl (nats, bits), elbo = ce_posterior + kl (an upper bound on
-log p per token), ce_prior (Z uniform, averaged over --prior_samples draws). Baseline: ce.
Parameters are restored straight into their shardings on the checkpoint config's mesh, with the
data axis folded into fsdp (--mesh_* override it; see checkpoint.inference_mesh_shape).
Results go to <workdir>/eval_step<N>.json and TensorBoard scalars under eval/ (local or gs://).
"""

import sys

from absl import app, flags

from free_transformer_jax import distributed
from free_transformer_jax.logs import setup_console_logging
from common import define_mesh_flags, mesh_overrides, run  # launch/common.py

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", lower_bound=0)
_SPLIT = flags.DEFINE_string("split", None, "Data split (default: the config's eval.split).")
_BATCHES = flags.DEFINE_integer("batches", None, "Batches to evaluate (default: eval.batches).",
                                lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: "
                                   "train.batch_size, rounded up to the mesh's batch shards).",
                                   lower_bound=1)
_PRIOR = flags.DEFINE_integer("prior_samples", None, "Z draws for ce_prior (default: "
                              "eval.prior_samples).", lower_bound=1)
_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "Override data.tfds_data_dir (data prepared "
                                "elsewhere).")
_CHOICE = flags.DEFINE_string("choice_task", None, "JSONL multiple-choice task to score.")
_Z_SAMPLES = flags.DEFINE_integer("z_samples", 4, "Z draws per choice for continuation scoring.",
                                  lower_bound=1)
_SKIP_DATA = flags.DEFINE_bool("skip_data", False, "Only score --choice_task.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the Z draws.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output (default: <workdir>/eval_step<N>.json).")
_MESH = define_mesh_flags()
distributed.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        distributed.initialize_from_flags()
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")
    setup_console_logging()  # -v sets the verbosity; Orbax/Grain INFO needs -v=1
    if _SKIP_DATA.value and not _CHOICE.value:
        sys.exit("error: --skip_data leaves nothing to evaluate; add --choice_task=FILE")
    import jax

    from free_transformer_jax import data as data_lib
    from free_transformer_jax import evaluate as eval_lib
    from free_transformer_jax import fs
    from free_transformer_jax.checkpoint import load_model, params_mesh

    # read the task first: a bad file fails in a second, not after the restore
    examples = eval_lib.read_choice_task(_CHOICE.value) if _CHOICE.value else None
    config, cfg, params, step = load_model(_WORKDIR.value, step=_STEP.value,
                                           mesh_overrides=mesh_overrides(_MESH))
    mesh = params_mesh(params)
    print(f"step {step}, mesh {dict(mesh.shape)}")
    if not _SKIP_DATA.value:  # the check training made: an explicit kernel must take these rows
        from free_transformer_jax.model.config import resolve_attention_impl
        print(resolve_attention_impl(cfg, mesh.devices.flat[0].platform,
                                     seq_len=config.data.seq_len,
                                     packed=config.data.packing != "none")[1])
    key = jax.random.key(_SEED.value)
    results = {"step": step, "workdir": _WORKDIR.value, "mesh": dict(mesh.shape),
               "model": "free_transformer" if cfg.latent else "baseline"}
    if not _SKIP_DATA.value:
        if _DATA_DIR.value:
            with config.unlocked():
                config.data.tfds_data_dir = _DATA_DIR.value
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        bs = _BATCH_SIZE.value or config.train.batch_size
        bs = -(-bs // shards) * shards
        split = _SPLIT.value or config.eval.split
        batches = data_lib.make_iterator(config, split, batch_size=bs // jax.process_count(),
                                         seed=_SEED.value)
        metrics = eval_lib.evaluate(cfg, params, batches, key,
                                    prior_samples=_PRIOR.value or config.eval.prior_samples,
                                    max_batches=_BATCHES.value or config.eval.batches, mesh=mesh)
        results["split"] = split
        results.update(metrics)
        for k, v in metrics.items():
            print(f"{k:14s} {v:.4f}" if isinstance(v, float) else f"{k:14s} {v}")
    if examples is not None:
        tok = data_lib.make_tokenizer(config)
        scored = eval_lib.score_choices(cfg, params, examples, tok, key=jax.random.fold_in(key, 1),
                                        z_samples=_Z_SAMPLES.value, mesh=mesh)
        results["choice_task"] = {k: v for k, v in scored.items() if k != "per_example"}
        results["choice_task"]["path"] = _CHOICE.value
        print(f"choice task    accuracy {scored['accuracy']:.4f} (length-normalised "
              f"{scored['accuracy_norm']:.4f}, chance {scored['chance']:.4f}, "
              f"{scored['n_examples']} examples)")

    out = _OUTPUT.value or fs.join(_WORKDIR.value, f"eval_step{step}.json")
    if jax.process_index() == 0:
        eval_lib.write_results(results, out, logdir=_WORKDIR.value)
        print(f"wrote {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    import jax

    jax.config.config_with_absl()  # --jax_* flags
    run(main)
