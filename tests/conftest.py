"""Test setup: 8 simulated CPU devices (must be set before jax is imported anywhere)."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# launch/ scripts import their shared helpers as `from common import ...` (their own directory is
# on sys.path when run as scripts); tests that load a launcher by path need the same.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
