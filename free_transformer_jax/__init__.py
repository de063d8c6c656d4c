"""The Free Transformer in JAX/Flax (README.md). Importing the package sets the project's default
XLA flags (``xla_flags.py``) unless ``XLA_FLAGS`` already names them."""

from free_transformer_jax import xla_flags as _xla_flags

_xla_flags.apply_defaults()
