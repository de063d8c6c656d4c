"""The base experiment configuration every ``configs/*.py`` file starts from.

Sections: ``model`` (the fields of :class:`ModelConfig`), ``data``, ``optim``, ``train``, ``mesh``,
``eval``, ``init`` (where a fresh run's parameters come from). Config files change what differs and
document every value the paper does not give.
Launch scripts load them with ``config_flags.DEFINE_config_file(..., lock_config=True)``, so
``--config.optim.lr=1e-4`` overrides a value and a misspelt field is an error.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import ml_collections

from free_transformer_jax import fs
from free_transformer_jax.model.config import ConfigError, ModelConfig

# Fields a resumed run may change: how long to train (the cosine schedule then spans the new
# length), how often to log/save/evaluate, the layout (checkpoints restore onto any mesh and
# grad_accum splits the same global batch), where prepared data now lives, and data-loading
# threads and buffers. Every other field is fixed once a run has a checkpoint; data.num_workers
# among them: grain's worker processes each read a slice of every document stream, so the worker
# count sets the batch order and the saved iterator state's layout.
RESUME_MUTABLE = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_ckpts",
                  "train.async_ckpt", "train.eval_every", "train.profile_steps", "train.grad_accum",
                  "mesh.*", "eval.*", "data.tfds_data_dir", "data.tokenizer_path",
                  "data.prefetch", "data.read_threads", "data.read_buffer",
                  "init.*")  # init.* only applies to a fresh run: a resume ignores it


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(ModelConfig().to_dict())

    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",  # synthetic (data/synthetic.py) | tfds (an ArrayRecord TFDS dataset)
        # model input length per row (targets are the inputs shifted by one); 65 = one 66-token
        # synthetic record
        seq_len=65,
        tokenizer="byte",  # byte | sentencepiece (ignored for the synthetic task's own alphabet)
        tokenizer_path="",  # the SentencePiece .model file
        tfds_name="",  # e.g. "local_text" as built by launch/prepare_data.py
        tfds_data_dir="",
        text_key="text",
        train_split="train",
        eval_split="validation",
        synthetic_size=1_000_000,  # records in the synthetic source (random access, deterministic)
        synthetic_seed=0,  # which synthetic dataset; independent of train.seed
        synthetic_eval_size=10_000,  # evaluation records (indices after the training ones)
        packing="first_fit",  # first_fit | concat (concat-and-split) | none (pad each document)
        packing_bins=0,  # first_fit rows packed together per document stream; 0: max(8, rows/stream)
        # document streams the global batch is cut into (each packs its own documents and fills
        # its own rows); 0: one per row. Fixed => the same batches for any process count.
        streams=0,
        add_bos=True,  # prepend BOS to each document (text sources)
        add_eos=True,  # append EOS to each document (text sources)
        shuffle=True,
        num_workers=0,  # grain worker processes (0: in the main process)
        prefetch=2,  # per-worker buffer (or a prefetch thread when num_workers=0)
        read_threads=4,  # grain read threads
        read_buffer=128,  # grain read-ahead buffer (records)
    ))

    # Llama-3-like AdamW recipe; the paper reuses its baseline's tuned recipe without giving it.
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-4,
        warmup_steps=100,
        schedule="cosine",  # cosine | constant (after warm-up)
        min_lr_ratio=0.1,  # final lr = lr * min_lr_ratio
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,  # not applied to norms, biases, zeta or the encoder position gain
        grad_clip=1.0,  # global-norm clipping; 0 disables
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=32,  # global sequences per optimizer step
        grad_accum=1,  # micro-batches per step (lax.scan inside the jitted step)
        seed=0,
        log_every=10,
        ckpt_every=500,
        keep_ckpts=3,
        async_ckpt=True,
        eval_every=0,  # evaluate (eval.split, eval.batches, eval.prior_samples) every N steps; 0: never
        profile_steps=0,  # >0: write a profiler trace of that many steps after warm-up
    ))

    # Mesh axes: data (pure data parallel), fsdp (data parallel + sharded params/optimizer),
    # tensor (model parallel). -1 takes the remaining devices. dcn_data splits data parallelism
    # across slices/hosts (multi-slice); the other axes stay within a slice.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))

    c.eval = ml_collections.ConfigDict(dict(
        split="validation",
        batches=8,
        prior_samples=4,  # Z draws for the prior-Z cross-entropy
    ))

    # Where a fresh run's parameters come from (init_from.py); ignored when the workdir already has
    # a checkpoint (resume wins). At most one may be set; both empty = random init.
    c.init = ml_collections.ConfigDict(dict(
        hf_llama_path="",  # a local Hugging Face Llama directory (config.json + *.safetensors)
        params_from="",  # WORKDIR[:STEP] of one of our runs: its parameters, not its optimizer state
    ))
    return c


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(field: str, patterns: Sequence[str]) -> bool:
    return any(field == m or (m.endswith(".*") and field.startswith(m[:-1])) for m in patterns)


def resume_changes(previous: Mapping[str, Any], current: Mapping[str, Any],
                   mutable: Sequence[str] = RESUME_MUTABLE) -> list[str]:
    """``"field: old -> new"`` for every field that differs between the run's recorded config and
    this one and is not in ``mutable`` (names, or ``section.*``). A field added to the code after
    the run was recorded reads as its :func:`base_config` default there (new fields keep the old
    behaviour by default, so a non-default value of one is a change); a field the code no longer
    has is ignored."""
    old = _flatten(previous)
    new = _flatten(json.loads(json.dumps(dict(current))))  # the same JSON types config.json holds
    default = _flatten(json.loads(json.dumps(base_config().to_dict())))
    old.update({k: default[k] for k in new.keys() - old.keys() if k in default})
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
            if old[k] != new[k] and not _matches(k, mutable)]


def check_resume(workdir: str, current: Mapping[str, Any]) -> None:
    """Refuses (one-line ConfigError) to resume ``workdir`` with a config that differs from its
    ``config.json`` in a field outside :data:`RESUME_MUTABLE`; a run without one is not checked."""
    recorded = fs.join(workdir, "config.json")
    if not fs.exists(recorded):
        return
    changes = resume_changes(fs.read_json(recorded, "config.json"), current)
    if changes:
        raise ConfigError(f"resuming {workdir} with a config that differs from its config.json in "
                          f"{'; '.join(changes)}; restore the recorded value(s) or use a new "
                          "--workdir (configlib.RESUME_MUTABLE lists what may change on resume, "
                          "e.g. train.steps)")
