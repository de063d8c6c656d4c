"""Hugging Face Llama -> ours: parity with transformers' LlamaForCausalLM, parameters built shard by
shard in their shardings, and one-line errors for checkpoints that do not fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from free_transformer_jax.convert import ConversionError, from_hf_llama  # noqa: E402
from free_transformer_jax.model.transformer import FreeTransformer  # noqa: E402
from hf_reference import hf_logits  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def make_hf(tmp_path, tie=False, rope=None, layers=4, seed=0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=97, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5,
              tie_word_embeddings=tie, initializer_range=0.1, max_position_embeddings=256,
              rope_theta=500_000.0 if rope else 10_000.0)
    if rope:
        kw["rope_scaling"] = dict(rope, rope_theta=kw["rope_theta"])
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():  # non-trivial norm scales, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return model, str(path)



@pytest.mark.parametrize("tie,rope", [(False, None), (True, LLAMA3_ROPE)])
def test_baseline_matches_hf_llama(tmp_path, tie, rope):
    model, path = make_hf(tmp_path, tie=tie, rope=rope)
    cfg, params = from_hf_llama(path, latent=False)
    assert cfg.tie_embeddings == tie and cfg.n_kv_heads == 2
    assert "readout" not in params if tie else "readout" in params
    tokens = jax.random.randint(jax.random.key(0), (2, 150), 0, cfg.vocab_size)
    ours, _ = jax.jit(FreeTransformer(cfg).apply)({"params": params}, tokens)
    ref = hf_logits(model, tokens)
    assert np.abs(ref).max() > 1.0  # logits of a size where a wrong piece would show
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_free_transformer_from_llama_keeps_the_decoder(tmp_path):
    model, path = make_hf(tmp_path, layers=5)
    cfg, params = from_hf_llama(path, latent=True, latent_bits=6, inject_layer=2, kappa_bits=1.0)
    assert cfg.latent and cfg.latent_bits == 6 and cfg.resolved_inject_layer == 2
    assert params["post_sampler"].shape == (64, 64) and "encoder" in params
    tokens = jax.random.randint(jax.random.key(1), (1, 40), 0, cfg.vocab_size)
    apply = jax.jit(FreeTransformer(cfg).apply)
    zeroed = {**params, "post_sampler": jnp.zeros_like(params["post_sampler"])}
    ours, aux = apply({"params": zeroed}, tokens, rngs={"latent": jax.random.key(0)})
    np.testing.assert_allclose(ours, hf_logits(model, tokens), rtol=1e-4, atol=1e-4)
    assert aux["kl"].shape == (1, 40)
    # the fresh latent parameters do change the output once the table is non-zero
    ours_z, _ = apply({"params": params}, tokens, rngs={"latent": jax.random.key(0)})
    assert float(jnp.max(jnp.abs(ours_z - ours))) > 1e-4


def test_bad_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ConversionError, match="config.json"):
        from_hf_llama(str(tmp_path))


def test_parameters_are_built_shard_by_shard_in_their_shardings(tmp_path, monkeypatch):
    """Each device shard reads only its slice of the file; nothing is whole on one device."""
    from free_transformer_jax import convert, sharding as shard_lib

    model, path = make_hf(tmp_path, layers=4)
    reads = []
    original = convert.SafetensorsDir.read

    def spy(self, name, index=()):
        out = original(self, name, index)
        reads.append((name, out.size, int(np.prod(self.shape(name)))))
        return out

    monkeypatch.setattr(convert.SafetensorsDir, "read", spy)
    mesh = shard_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    cfg, params = from_hf_llama(path, latent=False, mesh=mesh, inject_layer=2)
    _, target = convert.param_targets(cfg, mesh)
    for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(target)):
        assert a.sharding == s
    q = params["upper"]["layers"]["attn"]["q"]  # (1, D, heads, hd): fsdp on D, tensor on heads
    assert q.sharding.spec[1:3] == ("fsdp", "tensor")
    assert max(s.data.size for s in q.addressable_shards) == q.size // 8
    q_reads = [r for r in reads if r[0].endswith("layers.3.self_attn.q_proj.weight")]
    assert q_reads and all(size == full // 8 for _, size, full in q_reads)
    assert len(q_reads) == 8  # one read per distinct shard
    tokens = jax.random.randint(jax.random.key(2), (2, 40), 0, cfg.vocab_size)
    with shard_lib.mesh_context(mesh):
        ours, _ = jax.jit(FreeTransformer(cfg).apply)({"params": params}, tokens)
    np.testing.assert_allclose(ours, hf_logits(model, tokens), rtol=1e-4, atol=1e-4)


def test_config_that_differs_from_the_checkpoint_names_the_field(tmp_path):
    from free_transformer_jax import convert, sharding as shard_lib
    from free_transformer_jax.model.config import ModelConfig

    _, path = make_hf(tmp_path, layers=2)
    mesh = shard_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                      norm_eps=1e-5, latent=False)
    params = convert.load_llama_params(path, cfg, mesh)  # the matching config loads
    assert params["readout"].shape == (64, 97)
    with pytest.raises(ConversionError) as e:
        convert.load_llama_params(path, cfg.replace(ffn_dim=128, rope_theta=5e5), mesh)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model.ffn_dim=128 but ") and "intermediate_size=96" in msg
    assert "model.rope_theta=500000.0" in msg and "--config.model.ffn_dim=96" in msg


def test_tensors_that_disagree_with_config_json_are_refused(tmp_path):
    import json

    from free_transformer_jax import convert, sharding as shard_lib

    _, path = make_hf(tmp_path, layers=2)
    conf_path = f"{path}/config.json"
    conf = json.load(open(conf_path))
    conf["intermediate_size"] = 80
    json.dump(conf, open(conf_path, "w"))
    with pytest.raises(ConversionError, match=r"'model.layers.0.mlp.gate_proj.weight' .* has shape "
                                              r"\(96, 64\), expected \(80, 64\)"):
        from_hf_llama(path, latent=False)
    mesh = shard_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    with pytest.raises(ConversionError, match="not a directory"):
        convert.load_llama_params(str(tmp_path / "missing"), None, mesh)
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConversionError, match="no \\*.safetensors file"):
        from_hf_llama(str(empty), latent=False)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="config.json is not valid JSON"):
        from_hf_llama(str(empty))


def test_tied_llama3_checkpoint_survives_a_round_trip_through_export(tmp_path):
    """HF -> ours -> HF: tied embeddings and Llama-3 RoPE scaling are written back so that
    transformers rebuilds the original model. Also read: a checkpoint split over several files and
    one stored in bfloat16."""
    from free_transformer_jax import convert

    import copy
    import glob

    model, path = make_hf(tmp_path, tie=True, rope=LLAMA3_ROPE, layers=3)
    cfg, params = from_hf_llama(path, latent=False)
    # the same weights saved in several files (with an index), and saved in bfloat16
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(glob.glob(str(tmp_path / "sharded" / "*.safetensors"))) > 2
    _, sharded = from_hf_llama(str(tmp_path / "sharded"), latent=False)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(a, b)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, bf16 = from_hf_llama(str(tmp_path / "bf16"), latent=False)
    assert bf16["embedding"].dtype == np.float32
    np.testing.assert_array_equal(bf16["embedding"],
                                  model.model.embed_tokens.weight.detach().bfloat16().float().numpy())
    out = str(tmp_path / "back")
    assert convert.export_llama(cfg, params, out, max_len=256) == ["config.json", "model.safetensors"]
    again = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert again.config.tie_word_embeddings and again.config.rope_parameters["rope_type"] == "llama3"
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 100))
    np.testing.assert_allclose(hf_logits(again, tokens), hf_logits(model, tokens), rtol=1e-5, atol=1e-5)
