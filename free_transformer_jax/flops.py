"""Parameter counts (from ``jax.eval_shape``, nothing allocated) and, for issue 3, analytic FLOPs."""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from free_transformer_jax.model.config import ModelConfig
from free_transformer_jax.model.transformer import init_params


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part: total, decoder (shared with the baseline), encoder (the extra
    block + zeta + bit readout), post_sampler (the 2**H x D table), embedding/readout."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda k: init_params(cfg, k, seq_len=2),
                                          jax.random.key(0)))
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    enc = count(shapes.get("encoder", {}))
    table = count(shapes.get("post_sampler", {}))
    total = count(shapes)
    return {"total": total, "decoder": total - enc - table, "encoder": enc, "post_sampler": table,
            "embedding": count(shapes["embedding"]), "readout": count(shapes.get("readout", {}))}
