"""The base experiment configuration every ``configs/*.py`` file starts from.

Sections: ``model`` (a :class:`ModelConfig` as a dict), ``data``, ``optim``, ``train``, ``mesh``,
``eval``. Config files change what differs and document every value the paper does not give.
"""

from __future__ import annotations

import ml_collections

from free_transformer_jax.model.config import ModelConfig


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(ModelConfig().to_dict())
    return c
