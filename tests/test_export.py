"""Moving weights between our runs and Hugging Face: a run started from a HF Llama by config
(resume still wins), a run started from our own checkpoint (``init.params_from``), and
``launch/export.py`` (a baseline that transformers loads with our logits; a Free Transformer whose
latent parameters come back exactly). One real training run for the whole module."""

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from free_transformer_jax import convert, init_from  # noqa: E402
from free_transformer_jax import sharding as shard_lib  # noqa: E402
from free_transformer_jax.checkpoint import CheckpointError, Checkpointer, load_model  # noqa: E402
from free_transformer_jax.model.config import ConfigError, ModelConfig  # noqa: E402
from free_transformer_jax.model.transformer import FreeTransformer  # noqa: E402
from free_transformer_jax.train.optimizer import make_optimizer  # noqa: E402
from free_transformer_jax.train.state import TrainState  # noqa: E402
from free_transformer_jax.trainer import train  # noqa: E402
from helpers import tiny_train_config  # noqa: E402
from hf_reference import hf_logits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("export_cli", os.path.join(ROOT, "launch", "export.py"))
export_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_cli)


def tiny(**model):
    """tiny_train_config (3 steps) with any model field overridden."""
    c = tiny_train_config(steps=3)
    c.model.update(model)
    return c


def hf_twin_of(c, tmp):
    """A random HF Llama with exactly the shape of tiny_train_config's model (29 symbols)."""
    m = c.model
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, intermediate_size=m.ffn_dim,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=False,
        initializer_range=0.3, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(hf).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    path = os.path.join(tmp, "hf_llama")
    model.save_pretrained(path)
    return model, path



TOKENS = np.random.default_rng(0).integers(0, 29, (2, 48)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _apply(cfg):
    return jax.jit(FreeTransformer(cfg).apply)  # compiled once per model config


def ours(cfg, params):
    logits, _ = _apply(cfg)({"params": params}, TOKENS, rngs={"latent": jax.random.key(5)})
    return np.asarray(logits)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A baseline trained 3 steps from a HF Llama given by --config.init.hf_llama_path."""
    tmp = str(tmp_path_factory.mktemp("interop"))
    c = tiny(latent=False)
    model, hf_path = hf_twin_of(c, tmp)
    c.init.hf_llama_path = hf_path
    workdir = os.path.join(tmp, "baseline")
    train(c, workdir)
    return dict(tmp=tmp, model=model, hf_path=hf_path, workdir=workdir, config=c)


@pytest.fixture(scope="module")
def ft_run(run):
    """A Free Transformer (another inject layer) started from the baseline by init.params_from,
    saved as a checkpoint without training (the trainer hook is the one `run` exercised)."""
    c = tiny(latent=True, inject_layer=2)
    c.init.params_from = run["workdir"]
    cfg = ModelConfig.from_dict(c.model)
    mesh = shard_lib.make_mesh(c.mesh)
    params = init_from.initial_params(c, cfg, mesh, seed=0)
    tx = make_optimizer(c.optim, c.train.steps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    workdir = os.path.join(run["tmp"], "ft")
    ck = Checkpointer(workdir, async_save=False)
    ck.save(1, state, config=c.to_dict())
    ck.close()
    return dict(workdir=workdir, config=c, cfg=cfg)


def test_training_starts_from_the_hf_llama_and_resume_wins(run, capsys):
    _, cfg, params, step = load_model(run["workdir"])
    assert step == 3
    hf_emb = run["model"].model.embed_tokens.weight.detach().numpy()
    hf_q = run["model"].model.layers[2].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(hf_emb).max() > 0.5  # HF weights far from our random init (std 0.02)
    # three Adam steps of lr <= 3e-3 move each weight by at most ~1e-2: still the HF weights
    assert np.abs(np.asarray(params["embedding"]) - hf_emb).max() < 0.03
    ours_q = np.asarray(params["upper"]["layers"]["attn"]["q"][0]).reshape(32, -1).T
    assert np.abs(ours_q - hf_q).max() < 0.03
    assert np.abs(ours_q - hf_q).max() > 0  # and training did move them
    # an existing checkpoint wins over init: a missing HF path is never even opened
    c = tiny(latent=False)
    c.init.hf_llama_path = os.path.join(run["tmp"], "does_not_exist")
    capsys.readouterr()
    assert train(c, run["workdir"]) == {}
    assert "resumed from" in capsys.readouterr().out


def test_exported_baseline_loads_in_transformers_with_our_logits(run, tmp_path):
    out = str(tmp_path / "hf_out")
    files = export_cli.export(run["workdir"], out)
    assert sorted(files) == sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    _, cfg, params, _ = load_model(run["workdir"])
    ref = hf_logits(model, TOKENS)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours(cfg, params), ref, rtol=1e-4, atol=1e-4)
    # and our reader takes the exported directory back, bit for bit
    back = convert.load_llama_params(out, cfg, shard_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_params_from_continues_a_baseline_as_a_free_transformer(run, ft_run):
    _, base_cfg, base, _ = load_model(run["workdir"])
    _, cfg, ft, _ = load_model(ft_run["workdir"])
    assert base_cfg.resolved_inject_layer == 1 and cfg.resolved_inject_layer == 2
    # same blocks in the same order, re-split around the new injection point
    merged = lambda p: init_from._merge_layers(p)  # noqa: E731
    for a, b in zip(jax.tree.leaves(merged(base)), jax.tree.leaves(merged(ft))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(base["embedding"], ft["embedding"])
    assert ft["post_sampler"].shape == (16, 32) and float(jnp.abs(ft["post_sampler"]).max()) > 0
    # with Z's table zeroed the Free Transformer computes exactly the baseline's function
    zeroed = {**ft, "post_sampler": jnp.zeros_like(ft["post_sampler"])}
    np.testing.assert_allclose(ours(cfg, zeroed), ours(base_cfg, base), rtol=1e-5, atol=1e-5)


def test_params_from_another_kappa_keeps_every_parameter(ft_run):
    c = tiny(latent=True, inject_layer=2, kappa_bits=0.25)
    c.init.params_from = ft_run["workdir"] + ":1"
    cfg = ModelConfig.from_dict(c.model)
    mesh = shard_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = init_from.initial_params(c, cfg, mesh, seed=0)
    _, _, src, _ = load_model(ft_run["workdir"])
    _, target = convert.param_targets(cfg, mesh)
    assert jax.tree.structure(params) == jax.tree.structure(src)
    for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(src), jax.tree.leaves(target)):
        np.testing.assert_array_equal(a, b)
        assert a.sharding == s  # placed in the program's parameter shardings


def test_params_from_failures_name_the_field(run, ft_run):
    mesh = shard_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})

    def start(spec, **model):
        c = tiny(**model)
        c.init.params_from = spec
        return init_from.initial_params(c, ModelConfig.from_dict(c.model), mesh, seed=0)

    with pytest.raises(ConfigError, match=r"^model\.d_model=48 but the checkpoint .* has d_model=32"):
        start(run["workdir"], d_model=48)
    with pytest.raises(ConfigError, match=r"model\.latent_bits=5 .* latent_bits=4"):
        start(ft_run["workdir"], inject_layer=2, latent_bits=5)
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        start(run["workdir"] + ":7")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        start(os.path.join(run["tmp"], "nowhere"))
    with pytest.raises(ConfigError, match="step after ':' must be an integer"):
        start(run["workdir"] + ":last")
    c = tiny()
    c.init.params_from, c.init.hf_llama_path = run["workdir"], run["hf_path"]
    with pytest.raises(ConfigError, match="both set"):
        init_from.initial_params(c, ModelConfig.from_dict(c.model), mesh, seed=0)
    assert init_from.parse_params_from("gs://bucket/run") == ("gs://bucket/run", None)
    assert init_from.parse_params_from("gs://bucket/run:12") == ("gs://bucket/run", 12)


def test_free_transformer_export_round_trip(ft_run, tmp_path):
    out = str(tmp_path / "ft_hf")
    files = export_cli.export(ft_run["workdir"], out)
    assert sorted(files) == sorted(os.listdir(out)) == sorted(
        ["config.json", "model.safetensors", "latent.safetensors", "latent.json"])
    meta = json.load(open(os.path.join(out, "latent.json")))
    assert meta["inject_layer"] == 2 and meta["latent_bits"] == 4 and meta["model"]["latent"]
    assert meta["tensors"]["post_sampler"]["shape"] == [16, 32]
    assert "encoder/zeta" in meta["tensors"] and "encoder/bits" in meta["tensors"]
    _, cfg, params, _ = load_model(ft_run["workdir"])
    # back through the same config field a run uses: every parameter, bit for bit
    c = tiny(latent=True, inject_layer=2)
    c.init.hf_llama_path = out
    back = init_from.initial_params(c, cfg, shard_lib.make_mesh(c.mesh), seed=1)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)
    # same layout as load_model's (its inference mesh), so the same reductions: identical logits
    back = jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding), back, params)
    np.testing.assert_array_equal(ours(cfg, back), ours(cfg, params))
    # the directory's decoder is a Llama: ours with a zero Z table
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    zeroed = {**params, "post_sampler": jnp.zeros_like(params["post_sampler"])}
    np.testing.assert_allclose(ours(cfg, zeroed), hf_logits(model, TOKENS), rtol=1e-4, atol=1e-4)
    # the latent file must fit the config it is loaded into
    c.model.latent_bits = 5
    with pytest.raises(ConfigError, match=r"model\.latent_bits=5 but the latent parameters"):
        init_from.initial_params(c, ModelConfig.from_dict(c.model), shard_lib.make_mesh(c.mesh), 0)


def test_free_transformer_as_plain_llama_only_on_request(ft_run, tmp_path):
    _, cfg, params, _ = load_model(ft_run["workdir"])
    with pytest.raises(ConfigError, match="model.latent=True: a plain Llama holds only this Free "
                                          "Transformer's decoder.*--decoder_only"):
        convert.export_llama(cfg, params, str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused")
    out = str(tmp_path / "decoder")
    export_cli.export(ft_run["workdir"], out, decoder_only=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_export_failures_are_one_line(run, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        export_cli.export(str(tmp_path / "not_a_run"), str(tmp_path / "x"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty; pass a new or empty directory"):
        export_cli.export(run["workdir"], str(tmp_path / "full"))
    assert os.listdir(tmp_path / "full") == ["keep.txt"]


def test_sentencepiece_tokenizer_is_exported_for_transformers(run, tmp_path):
    from free_transformer_jax.data.local_tfds import train_sentencepiece
    from free_transformer_jax.data.tokenizers import SentencePieceTokenizer

    docs = ["the quick brown fox jumps over the lazy dog " * 3, "def f(x):\n    return x + 1\n"] * 40
    spm_path = train_sentencepiece(docs, str(tmp_path / "spm"), 300, num_threads=1)
    ours_tok = SentencePieceTokenizer(spm_path)
    _, cfg, params, _ = load_model(run["workdir"])
    out = str(tmp_path / "with_tok")
    files = convert.export_llama(cfg, params, out, tokenizer=ours_tok, spm_model=spm_path)
    assert {"tokenizer.model", "tokenizer_config.json"} <= set(files)
    conf = json.load(open(os.path.join(out, "config.json")))
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (ours_tok.bos_id, ours_tok.eos_id)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox returns x + 1"
    assert tok.encode(text, add_special_tokens=False) == ours_tok.encode(text)
    assert tok.encode(text)[0] == ours_tok.bos_id
