"""The host memory setting of the training launchers (free_transformer_jax/hostmem.py): what it
turns on, that it ends the per-step page faults of XLA:CPU's temporaries, and when it must not act."""

import json
import os
import subprocess
import sys

import jax
import pytest

from free_transformer_jax import hostmem

ROOT = os.path.join(os.path.dirname(__file__), "..")

# Runs a jitted program with a 32 MiB intermediate (and the matmuls' own work buffers) 6 times and
# reports the minor page faults per call after the first (which maps everything once).
_PROBE = r"""
import json, resource, sys
from free_transformer_jax import hostmem
line = hostmem.configure(sys.argv[1])
import jax, jax.numpy as jnp
x = jnp.ones((2048, 2048)); w = jnp.full((2048, 4096), 1e-3)
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ w.T))
f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"line": line, "faults": faults,
                  "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def _probe(mode):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="the tuning is for Linux with glibc")
def test_tuned_ends_the_page_faults_of_each_steps_temporaries():
    tuned, system = _probe("tuned"), _probe("system")
    assert tuned["line"].startswith("host memory: tuned") and tuned["async"] is False
    assert system["line"] == "host memory: as it is (--host_malloc=system)" and system["async"]
    # the intermediate alone is 8,192 pages of 4 KiB, faulted in again on every call by default
    # (270,000 faults a call were measured here: the matmuls' buffers as well)
    assert system["faults"] > 8000, system
    assert tuned["faults"] < system["faults"] / 20, (tuned, system)


def test_auto_tunes_only_where_the_cpu_computes():
    assert hostmem.runs_on_cpu({"JAX_PLATFORMS": "cpu"})
    assert hostmem.runs_on_cpu({"JAX_PLATFORMS": " CPU,tpu"})
    assert not hostmem.runs_on_cpu({"JAX_PLATFORMS": "tpu,cpu"})
    assert not hostmem.runs_on_cpu({"JAX_PLATFORMS": "cuda"})


def test_it_does_not_act_once_the_backend_runs_and_names_bad_modes():
    jax.devices()  # this test process's backend has started (conftest's simulated devices)
    line = hostmem.configure("tuned")
    assert line in ("host memory: as it is (JAX's backend had already started)",
                    "host memory: as it is (the tuning needs Linux with glibc)")
    assert jax.config.read("jax_cpu_enable_async_dispatch")  # untouched
    assert hostmem.configure("system") == line  # only the first call acts
    with pytest.raises(ValueError, match="--host_malloc='fast': expected one of auto, tuned, "
                                         "system"):
        hostmem.configure("fast")
