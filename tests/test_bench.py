"""The benchmark harness's variant syntax and the latent backward's chunk rule (the harness's
timing itself runs in bench/device_check.sh --dry-run; speed is never asserted in a test)."""

import os

import jax
import pytest

from free_transformer_jax import sharding as shard_lib
from free_transformer_jax.model import latent
from helpers import load_script, tiny_train_config


step_time = load_script(
    os.path.join(os.path.dirname(__file__), "..", "bench", "step_time.py"), "step_time")


def test_variants_take_typed_model_overrides():
    assert step_time.parse_variant("baseline") == ("baseline", {})
    kind, fields = step_time.parse_variant("free+latent_bits=12+latent_impl=dense+scan_layers=False")
    assert kind == "free" and fields == {"latent_bits": 12, "latent_impl": "dense",
                                         "scan_layers": False}
    c = step_time.case_config(tiny_train_config().to_dict(), "free+latent_bits=6", "xla")
    assert c.model.latent and c.model.latent_bits == 6 and c.model.attention_impl == "xla"
    assert not step_time.case_config(tiny_train_config().to_dict(), "baseline", None).model.latent


def test_variants_take_xla_flags_for_their_process():
    v = "free+latent_bits=6+xla_cpu_enable_concurrency_optimized_scheduler=True+xla_cpu_foo=3"
    assert step_time.xla_flags_of(v) == ("--xla_cpu_enable_concurrency_optimized_scheduler=true "
                                         "--xla_cpu_foo=3")
    c = step_time.case_config(tiny_train_config().to_dict(), v, None)  # not model fields
    assert c.model.latent_bits == 6 and "xla_cpu_foo" not in c.model
    assert step_time.xla_flags_of("baseline+latent_bits=6") == ""


@pytest.mark.parametrize("variant,match", [("fre", "must start with one of"),
                                           ("free+latent_bits", "is not a model_field=value"),
                                           ("free+bits=3", "the config has no model.bits")])
def test_bad_variants_are_named(variant, match):
    with pytest.raises(ValueError, match=match):
        step_time.case_config(tiny_train_config().to_dict(), variant, None)


def test_latent_chunk_rule_keeps_one_tensor_near_the_budget():
    budget = latent.LATENT_CHUNK_BYTES
    # the CPU bench shape: 8 rows, 2^16 codes -> 16 positions (8 x 16 x 65536 x 4 B = 32 MiB)
    assert latent.auto_token_chunk(8, 512, 2**16) == 16
    for rows, t, codes in [(8, 512, 2**16), (1, 4096, 2**16), (64, 65, 256), (16, 4096, 2**20)]:
        chunk = latent.auto_token_chunk(rows, t, codes)
        assert 1 <= chunk <= t
        assert rows * chunk * codes * 4 <= budget or chunk == 1
        assert chunk == t or rows * 2 * chunk * codes * 4 > budget  # the largest that fits
    assert latent.auto_token_chunk(64, 65, 256) == 65  # small tables: the whole sequence
    assert latent.auto_token_chunk(8, 512, 2**16, code_chunk=2**12) == 256


def test_rows_per_device_follows_the_mesh():
    assert latent.rows_per_device(16) == 16
    mesh = shard_lib.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    with shard_lib.mesh_context(mesh):
        assert latent.rows_per_device(16) == 4  # rows split over data x fsdp, not tensor


def test_variants_take_a_host_malloc_setting():
    c = step_time.case_config(tiny_train_config().to_dict(), "baseline+host_malloc=system", None)
    assert "host_malloc" not in c.model  # a process setting, not a model field
    with pytest.raises(ValueError, match="host_malloc must be auto, tuned or system"):
        step_time.case_config(tiny_train_config().to_dict(), "baseline+host_malloc=big", None)
