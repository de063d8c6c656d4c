"""The project's default XLA flags: appended once, never over a value the user chose."""

import os

from free_transformer_jax import xla_flags

FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def test_defaults_are_appended_once_and_keep_other_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    first = xla_flags.apply_defaults(env)
    assert first == f"--xla_force_host_platform_device_count=8 --{FLAG}=false"
    assert xla_flags.apply_defaults(env) == first  # idempotent
    assert xla_flags.apply_defaults({}) == f"--{FLAG}=false"


def test_a_flag_the_user_set_wins():
    for mine in (f"--{FLAG}=true", f"--{FLAG}=true --xla_cpu_use_onednn=false", f"--{FLAG}"):
        env = {"XLA_FLAGS": mine}
        assert xla_flags.apply_defaults(env) == mine
    # a longer flag that merely starts with the same name is a different flag
    env = {"XLA_FLAGS": f"--{FLAG}_extra=1"}
    assert xla_flags.apply_defaults(env).endswith(f"--{FLAG}=false")


def test_importing_the_package_applied_them():
    assert f"--{FLAG}=false" in os.environ["XLA_FLAGS"].split()
