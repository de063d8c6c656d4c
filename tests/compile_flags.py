"""XLA flags of every process the suite starts (imports nothing, so conftest can read it before
jax is imported).

The suite's models are tiny, so compiling costs more than running: XLA's LLVM backend at -O0
without its expensive passes compiles them faster (about 6% of the wall time of the training-heavy
files, 30% of tests/test_model.py; BUILD_NOTES "Test suite time"). Neither flag changes the HLO
program (fusion, layouts and buffer assignment are decided before the backend), only how well its
loops are compiled, and every comparison in the suite is between programs compiled alike.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with ``devices`` simulated CPU devices."""
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"
