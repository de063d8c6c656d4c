"""Hugging Face Llama directories <-> our parameters, one tensor at a time (no torch needed).

In: :func:`load_llama_params` reads ``config.json`` and the ``*.safetensors`` files (single or
sharded with ``model.safetensors.index.json``) of a ``LlamaForCausalLM`` directory and builds each
of our parameters with ``jax.make_array_from_callback`` in its ``NamedSharding``: every device shard
reads only its own slice of the file (``safe_open(...).get_slice``), so no parameter is ever whole
on one device and the host holds at most one parameter. With the latent on, the encoder, ``zeta``,
bit readout and post-sampler come from ``latent.safetensors`` when the directory is one of our
exports, else they are freshly initialised: continued pre-training of a Llama as a Free Transformer.

Out: :func:`export_hf` writes a Llama directory (``config.json``, ``model.safetensors``, the
SentencePiece tokenizer files when there is one) and, for a Free Transformer, the latent parameters
in ``latent.safetensors`` (our own tensor names) described by ``latent.json``. Tensors are streamed
to the file one at a time (:class:`_SafetensorsWriter`). See BUILD_NOTES "Interop with Hugging Face".
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model.config import ConfigError, ModelConfig
from free_transformer_jax.model.transformer import init_params
from free_transformer_jax.train.state import abstract_params

LATENT_FILE = "latent.safetensors"
LATENT_JSON = "latent.json"
LATENT_FORMAT = "free_transformer_jax.latent.v1"

# Fields that fix the decoder's function, with their Hugging Face names (for messages).
HF_NAMES = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
            "head_dim": "head_dim", "ffn_dim": "intermediate_size", "rope_theta": "rope_theta",
            "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
            "rope_scaling_factor": "rope_scaling.factor",
            "rope_low_freq_factor": "rope_scaling.low_freq_factor",
            "rope_high_freq_factor": "rope_scaling.high_freq_factor",
            "rope_original_max_len": "rope_scaling.original_max_position_embeddings"}
# Fields that fix parameter shapes (a mismatch cannot be loaded at all).
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                "tie_embeddings")
LATENT_SHAPE_FIELDS = ("latent_bits", "encoder_abs_pos")


class ConversionError(ConfigError):
    """A checkpoint that cannot be converted (or does not fit the config); the message names the
    file or field and the fix."""


# Config ----------------------------------------------------------------------------------------------
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


def hf_config_from_model(cfg: ModelConfig, *, max_len: int = 4096, bos_id: int | None = None,
                         eos_id: int | None = None, pad_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of a ``LlamaForCausalLM`` equal to our decoder (the inverse of
    :func:`model_config_from_hf`)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling_factor,
                "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_len}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.resolved_head_dim,
            "intermediate_size": cfg.resolved_ffn_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "max_position_embeddings": int(max_len), "initializer_range": cfg.init_std,
            "rope_theta": cfg.rope_theta, "rope_parameters": rope,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
            "dtype": cfg.param_dtype, "use_cache": True}


def _field_value(cfg: ModelConfig, field: str) -> Any:
    return {"head_dim": cfg.resolved_head_dim, "ffn_dim": cfg.resolved_ffn_dim,
            "inject_layer": cfg.resolved_inject_layer}.get(field, getattr(cfg, field))


def mismatched_fields(cfg: ModelConfig, ref: ModelConfig, fields: Iterable[str]) -> list[str]:
    """The ``fields`` whose (resolved) values differ between ``cfg`` and ``ref``."""
    out = []
    for f in fields:
        a, b = _field_value(cfg, f), _field_value(ref, f)
        if isinstance(a, float) or isinstance(b, float):
            if not np.isclose(float(a), float(b), rtol=1e-9, atol=0.0):
                out.append(f)
        elif a != b:
            out.append(f)
    return out


def check_model_matches(cfg: ModelConfig, ref: ModelConfig, fields: Iterable[str], source: str,
                        names: dict[str, str] | None = None) -> None:
    """One-line ConversionError listing every field of ``cfg`` that differs from ``ref``."""
    bad = mismatched_fields(cfg, ref, fields)
    if not bad:
        return
    names = names or {}
    parts = [f"model.{f}={_field_value(cfg, f)!r} but {source} has "
             f"{names.get(f, f)}={_field_value(ref, f)!r}" for f in bad]
    fix = " ".join(f"--config.model.{f}={_field_value(ref, f)}" for f in bad)
    raise ConversionError("; ".join(parts) + f"; make the config match ({fix})")


def read_hf_config(path: str) -> dict[str, Any]:
    """``config.json`` of a HF model directory, with one-line errors for the usual mistakes."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path!r} is not a directory: pass a local Hugging Face model directory "
                              "(config.json + *.safetensors)")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{config_path} not found: pass a Hugging Face model directory "
                              "(the one save_pretrained wrote)")
    try:
        with open(config_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_path} is not valid JSON ({e.msg}, line {e.lineno})") from None


# Reading: one shard of one parameter at a time --------------------------------------------------------
class SafetensorsDir:
    """Lazy access to every tensor of a directory's safetensors files by name, in slices."""

    def __init__(self, path: str, files: list[str] | None = None):
        from safetensors import safe_open  # only conversion needs it

        if files is None:
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            else:
                files = sorted(n for n in os.listdir(path)
                               if n.endswith(".safetensors") and n != LATENT_FILE)
        if not files:
            raise ConversionError(f"no *.safetensors file in {path}; save the model with "
                                  "save_pretrained(..., safe_serialization=True)")
        self._handles = [safe_open(os.path.join(path, n), framework="numpy") for n in files]
        self._where = {k: h for h in self._handles for k in h.keys()}
        self.path = path

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """``tensor[index]`` reading only that part of the file."""
        sl = self._slice(name)
        return np.asarray(sl[index] if index else sl[:])

    def _slice(self, name: str):
        if name not in self._where:
            raise ConversionError(f"tensor {name!r} missing from the safetensors files in {self.path}")
        return self._where[name].get_slice(name)


def _span(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    assert step == 1, "device shards are contiguous"
    return start, stop


# How each of our decoder parameters is laid out in a HF checkpoint: (HF suffix, kind).
# kinds: "copy" (same layout), "t" (transposed matrix), "heads_in" (q/k/v: (n*hd, D) -> (D, n, hd)),
# "heads_out" (o: (D, h*hd) -> (h, hd, D)).
_BLOCK = {("attn_norm", "scale"): ("input_layernorm.weight", "copy"),
          ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "copy"),
          ("attn", "q"): ("self_attn.q_proj.weight", "heads_in"),
          ("attn", "k"): ("self_attn.k_proj.weight", "heads_in"),
          ("attn", "v"): ("self_attn.v_proj.weight", "heads_in"),
          ("attn", "o"): ("self_attn.o_proj.weight", "heads_out"),
          ("mlp", "gate"): ("mlp.gate_proj.weight", "t"),
          ("mlp", "up"): ("mlp.up_proj.weight", "t"),
          ("mlp", "down"): ("mlp.down_proj.weight", "t")}


def decoder_layout(cfg: ModelConfig) -> list[tuple[tuple[str, ...], list[str], str]]:
    """Every decoder parameter of the scanned layout as (our path, HF names, kind); a stacked
    parameter lists one HF name per layer."""
    n_lower = cfg.resolved_inject_layer
    out: list[tuple[tuple[str, ...], list[str], str]] = [
        (("embedding",), ["model.embed_tokens.weight"], "copy")]
    for (mod, leaf), (suffix, kind) in _BLOCK.items():
        if n_lower:
            out.append((("lower", "layers", mod, leaf),
                        [f"model.layers.{i}.{suffix}" for i in range(n_lower)], kind))
        out.append((("inject", mod, leaf), [f"model.layers.{n_lower}.{suffix}"], kind))
        if cfg.n_layers - n_lower - 1:
            out.append((("upper", "layers", mod, leaf),
                        [f"model.layers.{i}.{suffix}" for i in range(n_lower + 1, cfg.n_layers)], kind))
    out.append((("final_norm", "scale"), ["model.norm.weight"], "copy"))
    if not cfg.tie_embeddings:
        out.append((("readout",), ["lm_head.weight"], "t"))
    return out


def _read_one(st: SafetensorsDir, name: str, kind: str, index: tuple[slice, ...],
              shape: tuple[int, ...], hd: int) -> np.ndarray:
    """Our-layout slice ``index`` (of our shape ``shape``) of HF tensor ``name``."""
    if kind == "copy":
        return st.read(name, index)
    if kind == "t":
        return st.read(name, (index[1], index[0])).T
    if kind == "heads_in":  # ours[a, n, c] = W[n * hd + c, a]
        n0, n1 = _span(index[1], shape[1])
        w = st.read(name, (slice(n0 * hd, n1 * hd), index[0]))
        return w.T.reshape(w.shape[1], n1 - n0, hd)[:, :, index[2]]
    if kind == "heads_out":  # ours[n, c, a] = W[a, n * hd + c]
        n0, n1 = _span(index[0], shape[0])
        w = st.read(name, (index[2], slice(n0 * hd, n1 * hd)))
        return w.T.reshape(n1 - n0, hd, w.shape[0])[:, index[1], :]
    raise AssertionError(kind)


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "copy":
        return shape
    if kind == "t":
        return shape[::-1]
    if kind == "heads_in":
        return (shape[1] * shape[2], shape[0])
    return (shape[2], shape[0] * shape[1])  # heads_out


def place(shape: tuple[int, ...], dtype, sharding: NamedSharding,
          read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array built shard by shard from ``read(index)`` (each distinct index read once)."""
    cache: dict[tuple, np.ndarray] = {}

    def callback(index):
        key = tuple(_span(s, n) for s, n in zip(index, shape))
        if key not in cache:
            cache[key] = np.ascontiguousarray(read(tuple(index)), dtype=dtype)
        return cache[key]

    return jax.make_array_from_callback(tuple(shape), sharding, callback)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def param_targets(cfg: ModelConfig, mesh: Mesh) -> tuple[Any, Any]:
    """(abstract unboxed parameter tree, NamedSharding tree) of ``cfg`` on ``mesh``."""
    boxed = abstract_params(cfg)
    return nn.meta.unbox(boxed), shard_lib.param_shardings(boxed, mesh)


def read_decoder(st: SafetensorsDir, cfg: ModelConfig, abstract: Any, shardings: Any) -> dict:
    """Our decoder parameters (scanned layout) from a HF checkpoint, each built in its sharding."""
    hd = cfg.resolved_head_dim
    dtype = np.dtype(cfg.weight_dtype)
    params: dict = {}
    for path, names, kind in decoder_layout(cfg):
        target = _get(abstract, path)
        stacked = path[1:2] == ("layers",)
        one_shape = tuple(target.shape[1:]) if stacked else tuple(target.shape)
        for name in names:
            got = st.shape(name)
            if got != _hf_shape(kind, one_shape):
                raise ConversionError(
                    f"tensor {name!r} in {st.path} has shape {got}, expected "
                    f"{_hf_shape(kind, one_shape)} from the model config; the config.json and the "
                    "safetensors files disagree")

        def read(index, names=names, kind=kind, stacked=stacked, one_shape=one_shape):
            if not stacked:
                return _read_one(st, names[0], kind, index, one_shape, hd)
            l0, l1 = _span(index[0], len(names))
            return np.stack([_read_one(st, names[i], kind, index[1:], one_shape, hd)
                             for i in range(l0, l1)])

        _set(params, path, place(target.shape, dtype, _get(shardings, path), read))
    return params


def fresh_latent_params(cfg: ModelConfig, key: jax.Array, shardings: Any | None = None) -> dict:
    """Newly initialised encoder + post-sampler, built on a 2-layer, 1-token-vocab twin of ``cfg``
    (their shapes do not depend on depth or vocabulary), so no full-size init is needed. With
    ``shardings`` (our full parameter sharding tree) they are created in their shardings."""
    twin = cfg.replace(n_layers=2, inject_layer=1, vocab_size=1, scan_layers=True, latent=True)

    def init(k):
        params = nn.meta.unbox(init_params(twin, k, seq_len=2))
        return {"encoder": params["encoder"], "post_sampler": params["post_sampler"]}

    if shardings is None:
        return jax.jit(init)(key)
    out = {"encoder": shardings["encoder"], "post_sampler": shardings["post_sampler"]}
    with shard_lib.mesh_context(shardings["post_sampler"].mesh):
        return jax.jit(init, out_shardings=out)(key)


def _flat_names(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"encoder/block/attn/q": leaf, ...}``: our tensor names in the latent file."""
    return {prefix + "/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_latent(path: str, cfg: ModelConfig, abstract: Any, shardings: Any) -> dict:
    """Encoder + post-sampler from one of our exports' ``latent.safetensors``, in their shardings."""
    with open(os.path.join(path, LATENT_JSON)) as f:
        meta = json.load(f)
    if meta.get("format") != LATENT_FORMAT:
        raise ConversionError(f"{os.path.join(path, LATENT_JSON)}: format {meta.get('format')!r}, "
                              f"expected {LATENT_FORMAT!r}")
    src = ModelConfig.from_dict(meta["model"])
    check_model_matches(cfg, src, LATENT_SHAPE_FIELDS + ("inject_layer",),
                        f"the latent parameters in {path}")
    st = SafetensorsDir(path, [LATENT_FILE])
    dtype = np.dtype(cfg.weight_dtype)
    targets = {"encoder": abstract["encoder"], "post_sampler": abstract["post_sampler"]}
    shard = {"encoder": shardings["encoder"], "post_sampler": shardings["post_sampler"]}
    flat_t, flat_s = _flat_names(targets), _flat_names(shard)
    missing = sorted(set(flat_t) - set(st.keys()))
    if missing:
        raise ConversionError(f"{os.path.join(path, LATENT_FILE)} lacks {missing}; re-export it")
    out: dict = {}
    for name, target in flat_t.items():
        if st.shape(name) != tuple(target.shape):
            raise ConversionError(f"{LATENT_FILE} tensor {name!r} has shape {st.shape(name)}, expected "
                                  f"{tuple(target.shape)} from the model config")
        arr = place(target.shape, dtype, flat_s[name], lambda idx, name=name: st.read(name, idx))
        _set(out, tuple(name.split("/")), arr)
    return out


def load_llama_params(path: str, cfg: ModelConfig, mesh: Mesh, *, key: jax.Array | None = None,
                      check_config: bool = True) -> dict:
    """Parameters of ``cfg`` from the HF Llama directory ``path``, placed in ``cfg``'s parameter
    shardings on ``mesh``. The config's decoder fields must equal the checkpoint's (one-line error
    naming every field that differs). With ``cfg.latent`` the latent parameters come from the
    directory's ``latent.safetensors`` when present, else fresh from ``key``."""
    hf = read_hf_config(path)
    if check_config:
        check_model_matches(cfg, model_config_from_hf(hf), HF_NAMES, f"{path}/config.json", HF_NAMES)
    if not cfg.scan_layers:
        raise ConversionError("model.scan_layers=False: loading a Hugging Face checkpoint needs the "
                              "scanned layout; set --config.model.scan_layers=True")
    abstract, shardings = param_targets(cfg, mesh)
    params = read_decoder(SafetensorsDir(path), cfg, abstract, shardings)
    has_latent = os.path.exists(os.path.join(path, LATENT_JSON))
    if cfg.latent:
        if has_latent:
            params.update(read_latent(path, cfg, abstract, shardings))
            logging.info("latent parameters read from %s", os.path.join(path, LATENT_FILE))
        else:
            params.update(fresh_latent_params(cfg, jax.random.key(0) if key is None else key, shardings))
            logging.info("%s has no latent parameters: encoder and post-sampler freshly initialised", path)
    elif has_latent:
        logging.warning("%s holds a Free Transformer's latent parameters; model.latent=False uses its "
                        "decoder alone", path)
    return params


def from_hf_llama(path: str, *, latent: bool = True, key: jax.Array | None = None,
                  mesh: Mesh | None = None, **overrides) -> tuple[ModelConfig, dict]:
    """Reads a HF Llama directory into ``(ModelConfig, params)`` (scanned layout).

    The ModelConfig comes from ``config.json``; ``overrides`` set other fields (e.g.
    ``kappa_bits=0.5``, ``inject_layer=16``, ``dtype="bfloat16"``). Parameters are built directly in
    their shardings on ``mesh`` (default: every device on one FSDP axis, so a large checkpoint is
    spread over the devices rather than copied to each); ``key`` seeds fresh latent parameters.
    """
    cfg = model_config_from_hf(read_hf_config(path), latent=latent, **overrides)
    if mesh is None:
        mesh = shard_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    return cfg, load_llama_params(path, cfg, mesh, key=key, check_config=False)


# Writing -----------------------------------------------------------------------------------------------
_NP_TO_ST = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}


def _st_dtype(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype in _NP_TO_ST:
        return _NP_TO_ST[dtype]
    if dtype.name == "bfloat16":
        return "BF16"
    raise ConversionError(f"cannot write dtype {dtype} to safetensors")


class _SafetensorsWriter:
    """Writes a safetensors file whose tensors arrive one at a time (so an 8B export never holds
    more than one tensor on the host). The header (names, dtypes, shapes, offsets) is planned
    first, then each tensor is appended in the planned order."""

    def __init__(self, path: str, plan: list[tuple[str, tuple[int, ...], Any]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._order = []
        for name, shape, dtype in plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": _st_dtype(dtype), "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, tuple(shape), np.dtype(dtype)))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
        self._f = epath.Path(path).open("wb")  # local or gs://
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        want, shape, dtype = self._order[self._next]
        assert name == want and array.shape == shape, (name, want, array.shape, shape)
        self._f.write(np.ascontiguousarray(array, dtype=dtype).tobytes())
        self._next += 1

    def close(self) -> None:
        assert self._next == len(self._order), "not every planned tensor was written"
        self._f.close()


def _to_host(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _hf_tensors(kind: str, ours: np.ndarray) -> np.ndarray:
    """HF layout of one (unstacked) parameter of ours: the inverse of :func:`_read_one`."""
    if kind == "copy":
        return ours
    if kind == "t":
        return ours.T
    if kind == "heads_in":
        return ours.reshape(ours.shape[0], -1).T
    return ours.reshape(-1, ours.shape[-1]).T  # heads_out


def write_decoder(cfg: ModelConfig, params: dict, path: str) -> None:
    """``model.safetensors`` (HF Llama names and layout) from our decoder parameters."""
    layout = decoder_layout(cfg)
    plan = []
    for p, names, kind in layout:
        leaf = _get(params, p)
        one = tuple(leaf.shape[1:]) if p[1:2] == ("layers",) else tuple(leaf.shape)
        plan += [(n, _hf_shape(kind, one), leaf.dtype) for n in names]
    # transformers reads tensors by name, so the file's order (ours, one parameter at a time) is free
    writer = _SafetensorsWriter(str(epath.Path(path) / "model.safetensors"), plan, {"format": "pt"})
    for p, names, kind in layout:
        host = _to_host(_get(params, p))  # one parameter on the host at a time
        stacked = p[1:2] == ("layers",)
        for i, n in enumerate(names):
            writer.write(n, _hf_tensors(kind, host[i] if stacked else host))
        del host
    writer.close()


def write_latent(cfg: ModelConfig, params: dict, path: str) -> None:
    """``latent.safetensors`` (our names) and ``latent.json`` describing them."""
    flat = _flat_names({"encoder": params["encoder"], "post_sampler": params["post_sampler"]})
    writer = _SafetensorsWriter(str(epath.Path(path) / LATENT_FILE),
                                [(n, tuple(a.shape), a.dtype) for n, a in flat.items()],
                                {"format": LATENT_FORMAT})
    for n, a in flat.items():
        writer.write(n, _to_host(a))
    writer.close()
    meta = {
        "format": LATENT_FORMAT,
        "about": "The Free Transformer's latent parameters (free_transformer_jax). model.safetensors "
                 "beside this file is the shared decoder in Llama layout; block inject_layer "
                 "(0-based, HF model.layers.<inject_layer>) takes its keys and values from "
                 "x + post_sampler[Z], where Z's H bits are sampled from the encoder's bit logits.",
        "inject_layer": cfg.resolved_inject_layer, "latent_bits": cfg.latent_bits,
        "num_codes": cfg.num_codes, "kappa_bits": cfg.kappa_bits,
        "tensors": {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in flat.items()},
        "tensor_roles": {
            "encoder/zeta": "learned query (D) the encoder's queries start from",
            "encoder/pos_gain": "per-channel gain of the sinusoidal position signal on the queries",
            "encoder/block/*": "one non-causal Llama block (our layout: q/k/v (D, heads, head_dim), "
                               "o (heads, head_dim, D), MLP (D, F)/(F, D)); keys and values read the "
                               "decoder stream after inject_layer blocks",
            "encoder/norm/scale": "RMSNorm before the bit readout",
            "encoder/bits": "bit readout (D, H): logits of the H bits of Z",
            "post_sampler": "table (2**H, D): row Z is added to the injection block's key/value input"},
        "model": cfg.to_dict(),
    }
    (epath.Path(path) / LATENT_JSON).write_text(json.dumps(meta, indent=2))


def write_tokenizer(path: str, spm_model: str, *, bos_id: int | None, eos_id: int | None,
                    add_bos: bool, max_len: int) -> None:
    """A SentencePiece model as a HF ``LlamaTokenizer`` (``tokenizer.model`` + its config)."""
    import sentencepiece as spm

    (epath.Path(path) / "tokenizer.model").write_bytes(epath.Path(spm_model).read_bytes())
    sp = spm.SentencePieceProcessor(model_proto=epath.Path(spm_model).read_bytes())
    piece = lambda i: sp.id_to_piece(i) if i is not None and i >= 0 else None  # noqa: E731
    conf = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(bos_id), "eos_token": piece(eos_id),
            "unk_token": piece(sp.unk_id()), "pad_token": piece(sp.pad_id()),
            "add_bos_token": bool(add_bos and bos_id is not None), "add_eos_token": False,
            "model_max_length": int(max_len), "legacy": True}
    (epath.Path(path) / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in conf.items() if v is not None}, indent=2))


def export_llama(cfg: ModelConfig, params: dict, out: str, *, decoder_only: bool = False,
                 max_len: int = 4096, tokenizer: Any = None, spm_model: str = "",
                 add_bos: bool = True) -> list[str]:
    """Writes ``out`` as a plain Hugging Face ``LlamaForCausalLM`` directory (``config.json``,
    ``model.safetensors``, the tokenizer files when ``spm_model`` is given); returns the files.

    A Free Transformer's decoder alone is not the trained model (block ``inject_layer`` expects Z's
    contribution), so it is refused unless ``decoder_only=True`` asks for it on purpose; the Llama
    then equals our model with a zero post-sampler. ``tokenizer`` (ours) supplies BOS/EOS ids.
    """
    if cfg.latent and not decoder_only:
        raise ConversionError("model.latent=True: a plain Llama holds only this Free Transformer's "
                              "decoder, without Z; export with the latent files (export_hf, the "
                              "default of launch/export.py) or pass --decoder_only to drop them")
    if not cfg.scan_layers:
        raise ConversionError("model.scan_layers=False: export takes the scanned layout; convert with "
                              "model.transformer.stack_unrolled first")
    out_dir = epath.Path(out)  # a local path or gs://...
    if out_dir.is_file():
        raise ConversionError(f"--out={out!r} is a file; pass a directory (created if missing)")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConversionError(f"--out={out!r} is not empty; pass a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = dict(bos_id=getattr(tokenizer, "bos_id", None), eos_id=getattr(tokenizer, "eos_id", None),
               pad_id=getattr(tokenizer, "pad_id", None))
    (out_dir / "config.json").write_text(json.dumps(hf_config_from_model(cfg, max_len=max_len, **ids),
                                                     indent=2))
    write_decoder(cfg, params, out)
    files = ["config.json", "model.safetensors"]
    if spm_model:
        write_tokenizer(out, spm_model, bos_id=ids["bos_id"], eos_id=ids["eos_id"], add_bos=add_bos,
                        max_len=max_len)
        files += ["tokenizer.model", "tokenizer_config.json"]
    return files


def export_hf(cfg: ModelConfig, params: dict, out: str, *, decoder_only: bool = False,
              **kw) -> list[str]:
    """Our model as a Hugging Face directory; returns the files written. A baseline: a plain Llama
    (:func:`export_llama`). A Free Transformer: the same Llama directory for its decoder plus the
    latent parameters in ``latent.safetensors`` described by ``latent.json``, which
    :func:`load_llama_params` (and ``--config.init.hf_llama_path``) read back exactly;
    ``decoder_only=True`` writes the decoder alone. ``kw`` goes to :func:`export_llama`."""
    files = export_llama(cfg, params, out, decoder_only=True, **kw)
    if cfg.latent and not decoder_only:
        write_latent(cfg, params, out)
        files += [LATENT_FILE, LATENT_JSON]
    return files
