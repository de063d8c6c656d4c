"""Hugging Face Llama checkpoints -> our parameters (no torch needed).

``from_hf_llama(path)`` reads ``config.json`` and the ``*.safetensors`` files (single or sharded with
``model.safetensors.index.json``) of a ``LlamaForCausalLM`` directory. With the latent on, the shared
decoder comes from Llama and the encoder, ``zeta``, bit readout and post-sampler are freshly
initialised: continued pre-training of an existing Llama as a Free Transformer.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from free_transformer_jax.model.config import ModelConfig
from free_transformer_jax.model.transformer import init_params


class ConversionError(ValueError):
    pass


def model_config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
    """Our ModelConfig from a HF Llama ``config.json`` dict; ``overrides`` set any other field."""
    if hf.get("model_type", "llama") != "llama":
        raise ConversionError(f"model_type={hf.get('model_type')!r}: only 'llama' checkpoints are supported")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConversionError(f"{flag}=true is not supported (Llama has no biases); "
                                  "convert a checkpoint without biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={hf['hidden_act']!r}: only SwiGLU ('silu') is supported")
    # transformers >= 5 writes rope_parameters; older files have rope_theta and rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"], rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if rope_type == "llama3":
        fields.update(rope_scaling_factor=float(rope["factor"]),
                      rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_len=int(rope["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise ConversionError(f"rope type {rope_type!r} is not supported (supported: default, llama3)")
    fields.update(overrides)
    return ModelConfig(**fields)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open  # imported here: only conversion needs it

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"no *.safetensors file in {path}; save the model with "
                              "save_pretrained(..., safe_serialization=True)")
    tensors = {}
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):  # the flax framework reads bfloat16, which numpy cannot
        for name in files:
            with safe_open(os.path.join(path, name), framework="flax") as f:
                for key in f.keys():
                    tensors[key] = np.asarray(f.get_tensor(key))
    return tensors


def llama_params_from_tensors(cfg: ModelConfig, t: dict[str, np.ndarray], dtype=np.float32) -> dict:
    """Our decoder parameter tree (scanned layout) from HF tensor names."""
    d, h, kvh, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim

    def get(name):
        if name not in t:
            raise ConversionError(f"tensor {name!r} missing from the checkpoint")
        return np.asarray(t[name]).astype(dtype)

    def block(i):
        p = f"model.layers.{i}."
        return {
            "attn_norm": {"scale": get(p + "input_layernorm.weight")},
            "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight")},
            "attn": {"q": get(p + "self_attn.q_proj.weight").T.reshape(d, h, hd),
                     "k": get(p + "self_attn.k_proj.weight").T.reshape(d, kvh, hd),
                     "v": get(p + "self_attn.v_proj.weight").T.reshape(d, kvh, hd),
                     "o": get(p + "self_attn.o_proj.weight").T.reshape(h, hd, d)},
            "mlp": {"gate": get(p + "mlp.gate_proj.weight").T, "up": get(p + "mlp.up_proj.weight").T,
                    "down": get(p + "mlp.down_proj.weight").T},
        }

    def stack(layers):
        return {"layers": jax.tree.map(lambda *a: np.stack(a), *layers)} if layers else None

    n_lower = cfg.resolved_inject_layer
    params = {"embedding": get("model.embed_tokens.weight"),
              "lower": stack([block(i) for i in range(n_lower)]),
              "inject": block(n_lower),
              "upper": stack([block(i) for i in range(n_lower + 1, cfg.n_layers)]),
              "final_norm": {"scale": get("model.norm.weight")}}
    if not cfg.tie_embeddings:
        params["readout"] = get("lm_head.weight").T
    return {k: v for k, v in params.items() if v is not None}


def fresh_latent_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Newly initialised encoder + post-sampler, built on a 2-layer, 1-token-vocab twin of ``cfg``
    (their shapes do not depend on depth or vocabulary), so no full-size init is needed."""
    twin = cfg.replace(n_layers=2, inject_layer=1, vocab_size=1, scan_layers=True, latent=True)
    params = nn.meta.unbox(init_params(twin, key, seq_len=2))
    return {"encoder": params["encoder"], "post_sampler": params["post_sampler"]}


def from_hf_llama(path: str, *, latent: bool = True, key: jax.Array | None = None,
                  **overrides) -> tuple[ModelConfig, dict]:
    """Reads a HF Llama directory into ``(ModelConfig, params)`` (plain arrays, scanned layout).

    ``overrides`` set other ModelConfig fields (e.g. ``kappa_bits=0.5``, ``inject_layer=16``,
    ``dtype="bfloat16"``); ``key`` seeds the fresh latent parameters (default: PRNGKey(0)).
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{config_path} not found: pass a Hugging Face model directory")
    with open(config_path) as f:
        hf = json.load(f)
    cfg = model_config_from_hf(hf, latent=latent, **overrides)
    if not cfg.scan_layers:
        raise ConversionError("from_hf_llama returns the scanned layout; convert with scan_layers=True "
                              "and use model.transformer.unstack_layers for the unrolled one")
    params = llama_params_from_tensors(cfg, _read_safetensors(path), dtype=np.dtype(cfg.weight_dtype))
    params = jax.tree.map(jnp.asarray, params)
    if latent:
        params.update(fresh_latent_params(cfg, jax.random.PRNGKey(0) if key is None else key))
    return cfg, params
