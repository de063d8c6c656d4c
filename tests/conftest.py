"""Test setup: 8 simulated CPU devices (must be set before jax is imported anywhere)."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole suite, its subprocesses and both xdist workers:
# many tests compile the same tiny step (a resumed run, a launcher after train()); a hit skips
# the compile. The key covers the program, XLA_FLAGS and the versions, so a hit is the same
# executable. A size limit turns on the cache's file lock, which makes concurrent writers safe.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "free_transformer_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 ** 30))

# launch/ scripts import their shared helpers as `from common import ...` (their own directory is
# on sys.path when run as scripts); tests that load a launcher by path need the same.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
