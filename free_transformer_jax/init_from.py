"""Where a fresh run's parameters come from: the config's ``init`` section.

``init.hf_llama_path=DIR``: a local Hugging Face Llama directory (``convert.load_llama_params``).
``init.params_from=WORKDIR[:STEP]``: the parameters of one of our own checkpoints (latest step by
default), e.g. to fine-tune with another ``kappa_bits`` or to continue a baseline as a Free
Transformer. Either way the parameters are created in the program's parameter shardings, never
whole on one device; the training loop passes them to ``train.state.init_state`` for a fresh run
only (a resumed run restores its own checkpoint). See BUILD_NOTES "Interop with Hugging Face".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh

from free_transformer_jax import checkpoint as ckpt_lib
from free_transformer_jax import convert
from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model.config import ConfigError, ModelConfig
from free_transformer_jax.model.transformer import stack_unrolled, unstack_layers
from free_transformer_jax.train.state import PARAMS, purpose_key


def init_section(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(hf_llama_path, params_from) of a config; a config without an ``init`` section has neither."""
    init = config.get("init") or {}
    hf, ours = str(init.get("hf_llama_path", "") or ""), str(init.get("params_from", "") or "")
    if hf and ours:
        raise ConfigError("init.hf_llama_path and init.params_from are both set; a run starts from "
                          "one of them: clear the other")
    return hf, ours


def parse_params_from(spec: str) -> tuple[str, int | None]:
    """``WORKDIR[:STEP]`` -> (workdir, step or None); ``gs://...`` paths keep their colon."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail.isdigit():
        return head, int(tail)
    if sep and "/" not in tail:
        raise ConfigError(f"init.params_from={spec!r}: the step after ':' must be an integer "
                          "(WORKDIR or WORKDIR:STEP)")
    return spec, None


def initial_params(config: ml_collections.ConfigDict, cfg: ModelConfig, mesh: Mesh,
                   seed: int) -> Any | None:
    """The parameters a fresh run starts from, in ``cfg``'s parameter shardings on ``mesh``, or
    None for a random init. Fresh latent parameters use the run's parameter key (``seed``)."""
    hf, ours = init_section(config)
    key = purpose_key(seed, PARAMS)
    if hf:
        params = convert.load_llama_params(hf, cfg, mesh, key=key)
        logging.info("initialised from the Hugging Face checkpoint %s", hf)
        return params
    if ours:
        workdir, step = parse_params_from(ours)
        return params_from_checkpoint(workdir, cfg, mesh, step=step, key=key)
    return None


def _merge_layers(params: dict) -> dict[str, Any]:
    """{leaf path: (n_layers, ...) array} of all decoder blocks in order (scanned layout)."""
    parts = []
    if "lower" in params:
        parts.append(params["lower"]["layers"])
    parts.append(jax.tree.map(lambda a: a[None], params["inject"]))
    if "upper" in params:
        parts.append(params["upper"]["layers"])
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *parts)


def _split_layers(blocks: Any, cfg: ModelConfig) -> dict[str, Any]:
    n_lower = cfg.resolved_inject_layer
    out = {"inject": jax.tree.map(lambda a: a[n_lower], blocks)}
    if n_lower:
        out["lower"] = {"layers": jax.tree.map(lambda a: a[:n_lower], blocks)}
    if cfg.n_layers - n_lower - 1:
        out["upper"] = {"layers": jax.tree.map(lambda a: a[n_lower + 1:], blocks)}
    return out


def params_from_checkpoint(workdir: str, cfg: ModelConfig, mesh: Mesh, *, step: int | None = None,
                           key: jax.Array | None = None) -> Any:
    """Parameters of ``cfg`` from our checkpoint in ``workdir`` (no optimizer state), in their
    shardings on ``mesh``. Parameter shapes must agree (a mismatch is refused naming the field);
    the decoder is re-split when ``inject_layer`` differs; latent parameters are kept when both
    models have them, freshly initialised when the source is a baseline, dropped when the target is."""
    ck = ckpt_lib.Checkpointer(workdir, async_save=False, create=False)
    try:
        step = ck.latest_step() if step is None else step
        # restore_config names the directory and the available steps when there is no such step
        src = ModelConfig.from_dict(ck.restore_config(step=step)["model"])
        where = f"init.params_from={workdir}:{step}"
        convert.check_model_matches(cfg, src, convert.SHAPE_FIELDS, f"the checkpoint ({where})")
        if cfg.latent and src.latent:
            convert.check_model_matches(cfg, src, convert.LATENT_SHAPE_FIELDS, f"the checkpoint ({where})")
        different = convert.mismatched_fields(cfg, src, ("rope_theta", "norm_eps", "rope_scaling_factor",
                                                         "param_dtype"))
        if different:
            logging.warning("%s: model fields %s differ from the checkpoint's; starting from its "
                            "parameters anyway", where, different)
        src_abstract, src_shardings = convert.param_targets(src, mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              src_abstract, src_shardings)
        restored = ck.restore_params(target, step=step)
    finally:
        ck.close()

    abstract, shardings = convert.param_targets(cfg, mesh)
    keep_latent = cfg.latent and src.latent

    def reshape(restored):
        """The source tree rearranged into the target's (decoder re-split, dtype cast)."""
        restored = dict(stack_unrolled(restored) if not src.scan_layers else restored)
        out = {k: restored[k] for k in ("embedding", "final_norm", "readout") if k in restored}
        if src.resolved_inject_layer == cfg.resolved_inject_layer:
            out.update({k: restored[k] for k in ("lower", "inject", "upper") if k in restored})
        else:
            out.update(_split_layers(_merge_layers(restored), cfg))
        if keep_latent:
            out.update(encoder=restored["encoder"], post_sampler=restored["post_sampler"])
        if not cfg.scan_layers:
            out = unstack_layers(out)
        return jax.tree.map(lambda a: a.astype(cfg.weight_dtype), out)

    names = set(jax.eval_shape(reshape, restored))
    with shard_lib.mesh_context(mesh):  # one compiled program, written straight into its shardings
        out = jax.jit(reshape, out_shardings={k: shardings[k] for k in names})(restored)
    del restored
    if cfg.latent and not src.latent:
        out.update(convert.fresh_latent_params(cfg, jax.random.key(0) if key is None else key, shardings))
        logging.info("%s is a baseline: encoder and post-sampler freshly initialised", workdir)
    elif src.latent and not cfg.latent:
        logging.warning("%s is a Free Transformer; model.latent=False keeps its decoder only", workdir)
    if jax.tree.structure(out) != jax.tree.structure(abstract):
        raise ConfigError(f"init.params_from={workdir}: the checkpoint's parameter tree does not fit "
                          "the model section of the config")
    logging.info("initialised from %s step %d", workdir, step)
    return out
