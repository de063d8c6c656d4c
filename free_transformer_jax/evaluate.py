"""Honest likelihoods for the Free Transformer (BUILD_NOTES.md, "Evaluation and generation") and
continuation scoring.

Cross-entropy with the encoder's Z leaks up to kappa nats per token of the answer into Z, so it is
never comparable to a baseline's CE. Reported per token:
  ce_posterior  CE with Z sampled from the encoder (what training minimises)
  kl_nats/bits  KL(Q || uniform prior)
  elbo          ce_posterior + kl_nats: the ELBO bound, an upper bound on -log p per token
  ce_prior      CE with Z drawn from the uniform prior, averaged over ``prior_samples`` draws
and for a baseline only ``ce``.

Continuation scoring (multiple choice): the context's Z comes from the encoder run on the context
ONLY; the continuation's Z from the prior; the choice likelihood is averaged (in probability,
i.e. log-mean-exp) over ``z_samples`` draws, with the same draws for every choice of an example.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from free_transformer_jax import fs
from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model import kernels
from free_transformer_jax.model import latent as latent_lib
from free_transformer_jax.model.config import ConfigError, ModelConfig
from free_transformer_jax.model.transformer import FreeTransformer
from free_transformer_jax.train.loss import cross_entropy, token_masks

Batch = dict[str, jax.Array]


def _mesh_scope(mesh: Mesh | None):
    return shard_lib.mesh_context(mesh) if mesh is not None else contextlib.nullcontext()


# Dataset likelihoods -------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "prior_samples"))
def eval_sums(cfg: ModelConfig, params: Any, batch: Batch, key: jax.Array, prior_samples: int
              ) -> dict[str, jax.Array]:
    """Sums over one batch (divided by the token counts after all batches are seen)."""
    model = FreeTransformer(cfg)
    target_mask, latent_mask = token_masks(batch)
    kw = dict(segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))

    def ce_sum(latent, k):
        logits, aux = model.apply({"params": params}, batch["inputs"], latent=latent,
                                  rngs={"latent": k}, **kw)
        return jnp.sum(cross_entropy(logits, batch["targets"]) * target_mask), aux

    ce_post, aux = ce_sum("posterior", jax.random.fold_in(key, 0))
    out = {"n_targets": jnp.sum(target_mask), "n_latents": jnp.sum(latent_mask), "ce_posterior": ce_post}
    if cfg.latent:
        out["kl_nats"] = jnp.sum(aux["kl"] * latent_mask)
        prior = [ce_sum("prior", jax.random.fold_in(key, 1 + i))[0] for i in range(prior_samples)]
        out["ce_prior"] = sum(prior) / prior_samples
    return out


def finalize(sums: dict[str, float], cfg: ModelConfig) -> dict[str, float]:
    """Per-token metrics from accumulated sums."""
    n_t = max(sums["n_targets"], 1.0)
    if not cfg.latent:
        return {"ce": sums["ce_posterior"] / n_t, "n_tokens": sums["n_targets"]}
    ce_post = sums["ce_posterior"] / n_t
    kl = sums["kl_nats"] / max(sums["n_latents"], 1.0)
    return {"ce_posterior": ce_post, "kl_nats": kl, "kl_bits": kl / math.log(2.0),
            "elbo": ce_post + kl, "ce_prior": sums["ce_prior"] / n_t, "n_tokens": sums["n_targets"]}


def evaluate(cfg: ModelConfig, params: Any, batches: Iterable[dict[str, np.ndarray]], key: jax.Array,
             prior_samples: int = 4, max_batches: int | None = None, put=None,
             mesh: Mesh | None = None) -> dict[str, float]:
    """Accumulates :func:`eval_sums` over ``batches`` (host numpy dicts, this process's rows).

    With ``mesh`` (e.g. the one :func:`checkpoint.load_model` restored ``params`` onto) every batch
    is sharded over the mesh's batch axes and the model runs under its logical-axis rules; without
    it ``put`` places a batch (default ``jnp.asarray``)."""
    if put is None:
        put = ((lambda b: shard_lib.global_batch_from_host(b, mesh)) if mesh is not None
               else (lambda b: jax.tree.map(jnp.asarray, b)))
    totals: dict[str, float] = {}
    with _mesh_scope(mesh):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            if mesh is not None:
                rows = next(iter(batch.values())).shape[0] * jax.process_count()
                shard_lib.check_batch(rows, mesh, field="the evaluation batch size")
            sums = eval_sums(cfg, params, put(batch), jax.random.fold_in(key, i), prior_samples)
            for k, v in jax.device_get(sums).items():
                totals[k] = totals.get(k, 0.0) + float(v)
    if not totals:
        raise ConfigError("evaluation saw no batches: the eval split is empty or eval.batches is 0; "
                          "check data.eval_split (or --split) and eval.batches")
    return finalize(totals, cfg)


def write_results(results: dict[str, Any], output: str, logdir: str | None = None) -> str:
    """Writes ``results`` as JSON to ``output`` and its float metrics (and choice accuracies) as
    TensorBoard scalars under ``eval/`` in ``logdir``, local or remote alike (``fs.py``)."""
    fs.write_json(output, results, "--output")
    if logdir:
        scalars = {k: v for k, v in results.items() if isinstance(v, float)}
        if "choice_task" in results:
            scalars["choice_accuracy"] = results["choice_task"]["accuracy"]
            scalars["choice_accuracy_norm"] = results["choice_task"]["accuracy_norm"]
        writer = fs.summary_writer(logdir)
        for k, v in scalars.items():
            writer.add_scalar("eval/" + k, v, int(results["step"]))
        writer.close()
    return output


# Continuation scoring ------------------------------------------------------------------------------
class ChoiceTaskError(ValueError):
    """A choice-task file that cannot be scored; the message names the file, the line and the fix."""


_CHOICE_FORMAT = '{"context": str, "choices": [str, str, ...], "label": int}'


def _check_choice_example(ex: Any, where: str) -> dict[str, Any]:
    def bad(msg: str):
        raise ChoiceTaskError(f"{where}: {msg}; each line must be {_CHOICE_FORMAT}")

    if not isinstance(ex, dict):
        bad(f"a JSON {type(ex).__name__}, not an object")
    missing = [k for k in ("context", "choices", "label") if k not in ex]
    if missing:
        bad(f"missing field(s) {missing}")
    if not isinstance(ex["context"], str):
        bad(f'"context" is a {type(ex["context"]).__name__}, not a string')
    choices = ex["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        bad('"choices" must be a list of at least 2 strings')
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            bad(f'choice {i} is {c!r}, not a non-empty string')
    label = ex["label"]
    if isinstance(label, bool) or not isinstance(label, int):
        bad(f'"label" is {label!r}, not an integer')
    if not 0 <= label < len(choices):
        raise ChoiceTaskError(f"{where}: label {label} out of range for {len(choices)} choices "
                              f"(labels count from 0)")
    return ex


def read_choice_task(path: str) -> list[dict[str, Any]]:
    """JSONL with {"context": str, "choices": [str, ...], "label": int} per line (local or remote
    path), every line checked; a file with no examples is an error (never a NaN accuracy)."""
    text = fs.read_text(path, "--choice_task")
    examples = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChoiceTaskError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); each "
                                  f"line must be {_CHOICE_FORMAT}") from None
        examples.append(_check_choice_example(ex, f"{path}:{n}"))
    if not examples:
        raise ChoiceTaskError(f"{path}: no examples (the file is empty); give one JSON object per "
                              f"line, {_CHOICE_FORMAT}")
    return examples


@functools.partial(jax.jit, static_argnames=("cfg",))
def context_posterior(cfg: ModelConfig, params: Any, ctx_BL: jax.Array, ctx_seg_BL: jax.Array,
                      key: jax.Array, row_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(codes, bit logits) of the context from the encoder run on the context alone."""
    _, aux = FreeTransformer(cfg).apply({"params": params}, ctx_BL, latent="posterior",
                                        segment_ids=ctx_seg_BL, row_ids=row_ids,
                                        rngs={"latent": key})
    if not cfg.latent:
        return jnp.zeros(ctx_BL.shape, jnp.int32), jnp.zeros(ctx_BL.shape + (1,), jnp.float32)
    return aux["codes"], aux["bit_logits"]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _choice_loglik(cfg, params, tokens_BS, seg_BS, score_BS, codes_BS):
    logits, _ = FreeTransformer(cfg).apply({"params": params}, tokens_BS[:, :-1], latent=codes_BS[:, :-1],
                                           segment_ids=seg_BS[:, :-1])
    logp = -cross_entropy(logits, tokens_BS[:, 1:])
    return jnp.sum(logp * score_BS[:, 1:], axis=1)


def _rows(examples, tokenizer, bos: bool):
    """Per (example, choice): context ids, choice ids."""
    prefix = [tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []
    def encode(text: str, where: str) -> list[int]:
        try:
            return tokenizer.encode(text)
        except (KeyError, ValueError) as err:
            raise ChoiceTaskError(f"{where}: {err}; the task must use the model's tokenizer "
                                  f"({type(tokenizer).__name__})") from None

    for e, ex in enumerate(examples):
        ctx = prefix + encode(ex["context"], f"example {e} context")
        if not ctx:
            raise ChoiceTaskError(f"example {e}: empty context and no BOS token; give a context")
        for c, choice in enumerate(ex["choices"]):
            cont = encode(choice, f"example {e} choice {c}")
            if not cont:
                raise ChoiceTaskError(f"example {e} choice {c}: empty continuation")
            yield e, c, ctx, cont


def score_choices(cfg: ModelConfig, params: Any, examples: Sequence[dict], tokenizer, *,
                  key: jax.Array, z_samples: int = 4, batch_size: int = 32, bos: bool = True,
                  mesh: Mesh | None = None) -> dict[str, Any]:
    """Log-likelihood of every choice (sum and per-token), accuracy and length-normalised accuracy.
    With ``mesh``, rows are sharded over its batch axes (``batch_size`` rounded up to a multiple
    of them) and the model runs under its logical-axis rules."""
    if not examples:
        raise ChoiceTaskError("no examples to score")
    if z_samples < 1:
        raise ValueError(f"z_samples={z_samples}: must be >= 1")
    if mesh is not None:
        n = mesh.shape["data"] * mesh.shape["fsdp"]
        batch_size = -(-batch_size // n) * n
    put = jnp.asarray if mesh is None else functools.partial(shard_lib.put_replicated_rows, mesh=mesh)
    with _mesh_scope(mesh):
        return _score_choices(cfg, params, examples, tokenizer, key, z_samples, batch_size, bos, put)


def _score_choices(cfg, params, examples, tokenizer, key, z_samples, batch_size, bos, put):
    rows = list(_rows(examples, tokenizer, bos))
    loglik = np.zeros((len(rows), z_samples))
    n_tok = np.array([len(r[3]) for r in rows], np.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        pad = batch_size - len(chunk)  # a fixed batch: one compilation per (lc, ls)
        chunk = chunk + [chunk[-1]] * pad
        # rows padded (segment id 0) to lengths the attention takes: an explicit fused kernel
        # has length rules; the model reads ls - 1 tokens (inputs of the next-token targets)
        lc = kernels.kernel_length(cfg, max(len(r[2]) for r in chunk))
        ls = kernels.kernel_length(cfg, max(len(r[2]) + len(r[3]) for r in chunk) - 1) + 1
        ctx = np.zeros((batch_size, lc), np.int32)
        ctx_seg = np.zeros((batch_size, lc), np.int32)
        tokens = np.zeros((batch_size, ls), np.int32)
        seg = np.zeros((batch_size, ls), np.int32)
        score = np.zeros((batch_size, ls), np.float32)
        for i, (_, _, c, x) in enumerate(chunk):
            ctx[i, :len(c)] = c
            ctx_seg[i, :len(c)] = 1
            tokens[i, :len(c) + len(x)] = c + x
            seg[i, :len(c) + len(x)] = 1
            score[i, len(c):len(c) + len(x)] = 1
        example_ids = put(np.asarray([r[0] for r in chunk], np.int32))  # same Z for all choices
        ctx, ctx_seg, tokens, seg, score = map(put, (ctx, ctx_seg, tokens, seg, score))
        for s in range(z_samples):
            k = jax.random.fold_in(key, s)
            ctx_codes, _ = context_posterior(cfg, params, ctx, ctx_seg, jax.random.fold_in(k, 0),
                                             example_ids)
            prior = latent_lib.prior_codes(jax.random.fold_in(k, 1), (batch_size, ls),
                                           cfg.latent_bits, example_ids)
            codes = prior.at[:, :lc].set(jnp.where(ctx_seg > 0, ctx_codes, prior[:, :lc]))
            ll = _choice_loglik(cfg, params, tokens, seg, score, codes)
            loglik[start:start + len(chunk) - pad, s] = shard_lib.to_host(ll)[:len(chunk) - pad]
    # average the probability over Z draws
    ll = np.logaddexp.reduce(loglik, axis=1) - math.log(z_samples)
    per_example: list[dict[str, Any]] = [{"loglik": [], "loglik_per_token": []} for _ in examples]
    for (e, _, _, _), v, n in zip(rows, ll, n_tok):
        per_example[e]["loglik"].append(float(v))
        per_example[e]["loglik_per_token"].append(float(v / n))
    acc = np.mean([int(np.argmax(p["loglik"])) == int(ex["label"])
                   for p, ex in zip(per_example, examples)])
    acc_norm = np.mean([int(np.argmax(p["loglik_per_token"])) == int(ex["label"])
                        for p, ex in zip(per_example, examples)])
    chance = float(np.mean([1.0 / len(ex["choices"]) for ex in examples]))
    return {"accuracy": float(acc), "accuracy_norm": float(acc_norm), "chance": chance,
            "n_examples": len(examples), "z_samples": z_samples, "per_example": per_example}

