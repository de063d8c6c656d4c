"""Evaluate a checkpoint: honest per-token likelihoods on a data split, and/or continuation
scoring on a multiple-choice JSONL task.

    python launch/eval.py --workdir=/tmp/ft_demo
    python launch/eval.py --workdir=/tmp/ft_demo --choice_task=data/tasks/synthetic_choice.jsonl

Free Transformer: ce_posterior, kl (nats, bits), elbo = ce_posterior + kl (an upper bound on
-log p per token), ce_prior (Z uniform, averaged over --prior_samples draws). Baseline: ce.
Results go to <workdir>/eval_step<N>.json and TensorBoard scalars under eval/.
"""

import json
import os
import sys

from absl import app, flags, logging

from free_transformer_jax import distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SPLIT = flags.DEFINE_string("split", None, "Data split (default: the config's eval.split).")
_BATCHES = flags.DEFINE_integer("batches", None, "Batches to evaluate (default: eval.batches).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: "
                                   "train.batch_size, rounded up to the device count).")
_PRIOR = flags.DEFINE_integer("prior_samples", None, "Z draws for ce_prior (default: "
                              "eval.prior_samples).")
_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "Override data.tfds_data_dir (data prepared "
                                "elsewhere).")
_CHOICE = flags.DEFINE_string("choice_task", None, "JSONL multiple-choice task to score.")
_Z_SAMPLES = flags.DEFINE_integer("z_samples", 4, "Z draws per choice for continuation scoring.")
_SKIP_DATA = flags.DEFINE_bool("skip_data", False, "Only score --choice_task.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the Z draws.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output (default: <workdir>/eval_step<N>.json).")
distributed.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        distributed.initialize_from_flags()
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")
    logging.set_verbosity(logging.WARNING)
    import jax

    from free_transformer_jax import data as data_lib
    from free_transformer_jax import evaluate as eval_lib
    from free_transformer_jax import sharding as shard_lib
    from free_transformer_jax.checkpoint import CheckpointError, load_model
    from free_transformer_jax.model.config import ConfigError
    from free_transformer_jax.trainer import MetricWriter

    try:
        mesh = shard_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        config, cfg, params, step = load_model(_WORKDIR.value, step=_STEP.value, mesh=mesh)
    except (CheckpointError, ConfigError) as e:
        sys.exit(f"error: {e}")
    key = jax.random.key(_SEED.value)
    results = {"step": step, "workdir": _WORKDIR.value,
               "model": "free_transformer" if cfg.latent else "baseline"}
    try:
        if not _SKIP_DATA.value:
            if _DATA_DIR.value:
                with config.unlocked():
                    config.data.tfds_data_dir = _DATA_DIR.value
            n_dev = jax.device_count()
            bs = _BATCH_SIZE.value or config.train.batch_size
            bs = -(-bs // n_dev) * n_dev
            split = _SPLIT.value or config.eval.split
            batches = data_lib.make_iterator(config, split, batch_size=bs // jax.process_count(),
                                             seed=_SEED.value)
            with shard_lib.mesh_context(mesh):
                metrics = eval_lib.evaluate(
                    cfg, params, batches, key,
                    prior_samples=_PRIOR.value or config.eval.prior_samples,
                    max_batches=_BATCHES.value or config.eval.batches,
                    put=lambda b: shard_lib.global_batch_from_host(b, mesh))
            results["split"] = split
            results.update(metrics)
            for k, v in metrics.items():
                print(f"{k:14s} {v:.4f}" if isinstance(v, float) else f"{k:14s} {v}")
        if _CHOICE.value:
            tok = data_lib.make_tokenizer(config)
            examples = eval_lib.read_choice_task(_CHOICE.value)
            scored = eval_lib.score_choices(cfg, params, examples, tok, key=jax.random.fold_in(key, 1),
                                            z_samples=_Z_SAMPLES.value)
            results["choice_task"] = {k: v for k, v in scored.items() if k != "per_example"}
            results["choice_task"]["path"] = _CHOICE.value
            print(f"choice task    accuracy {scored['accuracy']:.4f} (length-normalised "
                  f"{scored['accuracy_norm']:.4f}, chance {scored['chance']:.4f}, "
                  f"{scored['n_examples']} examples)")
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")

    out = _OUTPUT.value or os.path.join(_WORKDIR.value, f"eval_step{step}.json")
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        writer = MetricWriter(_WORKDIR.value)
        writer.scalars(step, {k: v for k, v in results.items() if isinstance(v, float)}, prefix="eval/")
        if "choice_task" in results:
            writer.scalars(step, {"choice_accuracy": results["choice_task"]["accuracy"],
                                  "choice_accuracy_norm": results["choice_task"]["accuracy_norm"]},
                           prefix="eval/")
        writer.close()
        print(f"wrote {out}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
