"""Sampling with a fixed-shape KV cache (BUILD_NOTES.md, "Evaluation and generation").

* Prompt prefill runs the encoder on the prompt (non-causal over the prompt only) and SAMPLES the
  prompt's Z from it; the injection block's keys/values for the prompt enter the cache with it.
* Each new position draws its code uniformly from {0..C-1} once; its r enters block
  inject_layer + 1's cache and stays there. The encoder never runs during decoding.
* Z and tokens use separate random streams (``z_key`` and ``token_key``), and the noise of a row
  depends only on its Z group (for Z) or its row (for tokens): rows in the same Z group get the
  same Z (the paper's shared-Z experiment), and fixing both keys reproduces the same text.

Prompts of different lengths are left-padded (segment id 0, masked everywhere) so every row
decodes at the same cache slot; RoPE positions count real tokens only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model import latent as latent_lib
from free_transformer_jax.model.config import ModelConfig
from free_transformer_jax.model.layers import constrain
from free_transformer_jax.model.transformer import FreeTransformer, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy tokens (Z is still sampled: the paper always samples Z)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")


class PromptError(ValueError):
    """A prompt the checkpoint's tokenizer cannot encode; the message names the prompt."""


def encode_prompts(tokenizer, prompts: Sequence[str], bos: bool = True) -> list[list[int]]:
    """Token ids of each prompt (BOS first when ``bos`` and the tokenizer has one); a prompt with
    characters outside the tokenizer's alphabet, or an empty one with no BOS, is a
    :class:`PromptError` naming it."""
    prefix = [tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []
    out = []
    for i, p in enumerate(prompts):
        try:
            ids = prefix + tokenizer.encode(p)
        except (KeyError, ValueError) as e:
            raise PromptError(f"prompt {i} {p!r}: {e}; use only what the checkpoint's tokenizer "
                              f"encodes ({tokenizer!r})") from None
        if not ids:
            raise PromptError(f"prompt {i} is empty and the tokenizer has no BOS token; give at "
                              "least one character")
        out.append(ids)
    return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, P), segment_ids (B, P)) with prompts aligned on the right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. a BOS token)")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    seg = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        seg[i, width - len(p):] = 1
    return tokens, seg


def filter_logits(logits_BV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Top-k then nucleus (top-p) filtering; removed entries become -inf. Keeps at least one."""
    if top_k:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # keep a token if the mass strictly before it is < top_p
        before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < threshold, -jnp.inf, logits_BV)
    return logits_BV


def _constrain_cache(cache: dict[str, Any]) -> dict[str, Any]:
    """Lays the KV cache out like the activations it stores (batch over the batch axes, KV heads
    over tensor) under a mesh; a no-op without one."""
    def one(path, x):
        name = jax.tree_util.keystr(path)
        if x.ndim == 5:  # (layers, B, L, kv_heads, head_dim)
            return constrain(x, ("layers", "act_batch", "act_seq", "act_kv_heads", None))
        if x.ndim == 4:  # the injection block's (B, L, kv_heads, head_dim)
            return constrain(x, ("act_batch", "act_seq", "act_kv_heads", None))
        if x.ndim == 2 and "segment_ids" in name:
            return constrain(x, ("act_batch", "act_seq"))
        return x
    return jax.tree_util.tree_map_with_path(one, cache)


def _sample_tokens(key, logits_BV, step, sc: SamplingConfig):
    logits_BV = logits_BV.astype(jnp.float32)
    if sc.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = filter_logits(logits_BV / sc.temperature, sc.top_k, sc.top_p)
    rows = jnp.arange(logits_BV.shape[0])
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(rows)
    return jax.vmap(jax.random.categorical)(keys, logits_BV).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "sc", "return_logits", "prompt_z"))
def _generate(params, prompt_BP, seg_BP, z_groups_B, z_key, token_key, codes_BS=None, *,
              cfg: ModelConfig, sc: SamplingConfig, return_logits: bool = False,
              prompt_z: str = "encoder"):
    model = FreeTransformer(cfg)
    b, p = prompt_BP.shape
    total = p + sc.max_new_tokens
    positions = jnp.maximum(jnp.cumsum(seg_BP, axis=1) - 1, 0).astype(jnp.int32)
    cache = _constrain_cache(init_cache(cfg, b, total))
    # prefill: the encoder runs on the prompt and Z is sampled from its posterior (or, with
    # prompt_z="prior", the prompt's Z is uniform like every later position's)
    latent = "posterior" if prompt_z == "encoder" else "prior"
    if codes_BS is not None:  # the caller's Z (z_codes of generate)
        latent = codes_BS[:, :p]
    logits, aux = model.apply({"params": params}, prompt_BP, latent=latent, segment_ids=seg_BP,
                              positions=positions, cache=cache, row_ids=z_groups_B,
                              rngs={"latent": jax.random.fold_in(z_key, 0)})
    cache = aux["cache"]
    codes = jnp.zeros((b, total), jnp.int32)
    if cfg.latent:
        codes = codes.at[:, :p].set(aux["codes"])
    next_pos = positions[:, -1] + 1
    first = _sample_tokens(token_key, logits[:, -1], 0, sc)
    tokens = jnp.full((b, total), sc.pad_id, jnp.int32).at[:, :p].set(prompt_BP).at[:, p].set(first)
    stop = jnp.asarray(sc.stop_tokens or (-1,), jnp.int32)
    done = jnp.isin(first, stop)
    step_logits = jnp.zeros((b, sc.max_new_tokens, cfg.vocab_size) if return_logits else (0,),
                            jnp.float32)
    if return_logits:
        step_logits = step_logits.at[:, 0].set(logits[:, -1])

    def cond(state):
        i, _, _, _, done, _, _ = state
        return (i < sc.max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, codes, cache, done, pos, step_logits = state
        slot = p + i - 1  # the slot of the token we feed now (generated at step i - 1)
        tok = jax.lax.dynamic_slice_in_dim(tokens, slot, 1, axis=1)
        # a fresh uniform Z for this position, drawn once; shared within a Z group
        if codes_BS is None:
            code = latent_lib.prior_codes(jax.random.fold_in(z_key, i), (b, 1), cfg.latent_bits,
                                          z_groups_B)
        else:
            code = jax.lax.dynamic_slice_in_dim(codes_BS, slot, 1, axis=1)
        logits, aux = model.apply({"params": params}, tok, latent=code,
                                  segment_ids=jnp.ones((b, 1), jnp.int32), positions=pos[:, None],
                                  cache=cache)
        nxt = _sample_tokens(token_key, logits[:, -1], i, sc)
        nxt = jnp.where(done, sc.pad_id, nxt)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], slot + 1, axis=1)
        codes = jax.lax.dynamic_update_slice_in_dim(codes, code, slot, axis=1)
        if return_logits:
            step_logits = jax.lax.dynamic_update_slice_in_dim(step_logits, logits[:, -1:], i, axis=1)
        return i + 1, tokens, codes, aux["cache"], done | jnp.isin(nxt, stop), pos + 1, step_logits

    state = (jnp.ones((), jnp.int32), tokens, codes, cache, done, next_pos, step_logits)
    n, tokens, codes, _, done, _, step_logits = jax.lax.while_loop(cond, body, state)
    return tokens, codes, step_logits, n


def generate(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], sc: SamplingConfig, *,
             z_key: jax.Array, token_key: jax.Array, z_groups: Sequence[int] | None = None,
             return_logits: bool = False, prompt_z: str = "encoder", mesh: Mesh | None = None,
             z_codes: np.ndarray | None = None) -> dict[str, Any]:
    """Samples continuations of ``prompts`` (lists of token ids).

    z_groups: one id per prompt; prompts with the same id share Z (prompt Z and every new Z), the
      paper's shared-Z groups. Default: every row its own group (independent Z).
    prompt_z: ``"encoder"`` (default, the paper's generation: the prompt's Z is sampled from the encoder
      run on the prompt) or ``"prior"`` (the whole Z_1..Z_T uniform, e.g. for a prompt that says
      nothing about what follows, as in the synthetic task).
    Returns a dict with ``tokens`` (B, P + max_new) left-padded prompts + continuations,
    ``new_tokens`` (list per row, cut after a stop token), ``codes`` (B, P + max_new) the Z code of
    every slot (the last slot has none), ``prompt_len`` P, and with ``return_logits`` the per-step
    next-token ``logits`` (B, max_new, V).
    z_codes: (B, P + max_new) int codes in [0, 2**H) to use as Z instead of sampling it (slot s of
      the left-padded row, as in the returned ``codes``; pad slots are ignored), e.g. the encoder's
      posterior sample on a record, or a previous call's ``codes`` to replay its Z. ``z_key``,
      ``z_groups`` and ``prompt_z`` then play no part in Z.
    mesh: run under this mesh (e.g. the one :func:`checkpoint.load_model` restored ``params``
      onto): rows are sharded over its batch axes, padded to a multiple of them with rows of their
      own Z groups (a row's noise depends only on its group and index, so padding changes nothing).
    """
    prompt, seg = left_pad(prompts, sc.pad_id)
    b = prompt.shape[0]
    groups = np.arange(b, dtype=np.int32) if z_groups is None else np.asarray(z_groups, np.int32)
    if groups.shape != (b,):
        raise ValueError(f"z_groups has shape {groups.shape}; expected one id per prompt ({b},)")
    if prompt_z not in ("encoder", "prior"):
        raise ValueError(f"prompt_z={prompt_z!r}: expected 'encoder' or 'prior'")
    codes_in = None
    if z_codes is not None:
        if not cfg.latent:
            raise ValueError("z_codes: this model has no latent (model.latent=False)")
        codes_in = np.asarray(z_codes)
        want = (b, prompt.shape[1] + sc.max_new_tokens)
        if codes_in.shape != want or not np.issubdtype(codes_in.dtype, np.integer):
            raise ValueError(f"z_codes has shape {codes_in.shape} ({codes_in.dtype}); expected integer "
                             f"codes of shape {want} (rows x left-padded prompt + max_new_tokens)")
        if codes_in.min() < 0 or codes_in.max() >= 2 ** cfg.latent_bits:
            raise ValueError(f"z_codes must lie in [0, {2 ** cfg.latent_bits}) for H = "
                             f"{cfg.latent_bits} latent bits")
        codes_in = codes_in.astype(np.int32)
    put, scope = jnp.asarray, contextlib.nullcontext()
    if mesh is not None:
        n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
        extra = -b % n_batch
        if extra:
            prompt = np.concatenate([prompt, np.repeat(prompt[-1:], extra, axis=0)])
            seg = np.concatenate([seg, np.repeat(seg[-1:], extra, axis=0)])
            groups = np.concatenate([groups, groups.max() + 1 + np.arange(extra, dtype=np.int32)])
            if codes_in is not None:
                codes_in = np.concatenate([codes_in, np.repeat(codes_in[-1:], extra, axis=0)])
        put = functools.partial(shard_lib.put_replicated_rows, mesh=mesh)
        scope = shard_lib.mesh_context(mesh)
    with scope:
        tokens, codes, logits, n = _generate(params, put(prompt), put(seg), put(groups), z_key,
                                             token_key, None if codes_in is None else put(codes_in),
                                             cfg=cfg, sc=sc, return_logits=return_logits,
                                             prompt_z=prompt_z)
    tokens, codes, n = shard_lib.to_host(tokens)[:b], shard_lib.to_host(codes)[:b], int(n)
    seg = seg[:b]
    p = prompt.shape[1]
    new = []
    for row in tokens[:, p:p + n]:
        out = []
        for t in row.tolist():
            out.append(t)
            if t in sc.stop_tokens:
                break
        new.append(out)
    result = {"tokens": tokens, "codes": codes, "new_tokens": new, "prompt_len": p,
              "segment_ids": seg}
    if return_logits:
        result["logits"] = shard_lib.to_host(logits)[:b]
    return result
