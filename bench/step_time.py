"""Step time of compiled train steps, variants side by side in one run: the benchmark harness.

    python bench/step_time.py --config=configs/bench_cpu.py --variants=baseline,free \
        --attention_impl=blocked,xla --torch_reference --steps=2 --repeats=5
    python bench/step_time.py --config=configs/bench_cpu.py \
        --variants=baseline,free+latent_bits=8,free+latent_bits=12,free+latent_bits=12+latent_impl=dense

Each case (variant x attention_impl) is built by the project's program builder
(``train/program.py``: what is timed is what trains) in its own worker process, so its peak
memory is its own; the cases' timed rounds are interleaved (one round = ``--steps`` steps of every
case, in an order rotated each round), so a slow minute on a shared machine hits every case alike.
Prints, per case, the median step time and its spread over rounds, tokens/s, MFU (analytic FLOPs,
``flops.py``), compiled temporaries, peak RSS (and peak device memory on an accelerator), and per
attention_impl each variant's time / baseline time next to the analytic FLOP ratio, with its extra
peak RSS and temporaries (``--torch_reference``: also the baseline's speed relative to the same
decoder in PyTorch, timed in the same rounds). Writes
the whole record as JSON (``--json``; default ``$OUT/step_time.json`` when ``$OUT`` is set, else
``step_time.json``). Batches are random tokens, one document per row (no packing).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform as platform_lib
import statistics
import sys
import time
import traceback

from absl import app, flags
from ml_collections import config_flags

from free_transformer_jax import hostmem  # standard library only: no jax in the parent process

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_VARIANTS = flags.DEFINE_list(
    "variants", ["baseline", "free"],
    "baseline (model.latent=False) and/or free (latent=True), each optionally followed by "
    "model overrides (free+latent_bits=12+latent_impl=dense), XLA flags for that case's "
    "process (baseline+xla_cpu_enable_concurrency_optimized_scheduler=true) and its malloc "
    "setting (baseline+host_malloc=system).")
_IMPLS = flags.DEFINE_list("attention_impl", [], "model.attention_impl values to compare "
                           "(default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per case per round.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Rounds; each runs --steps steps of every case.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per case after compiling.")
_JSON = flags.DEFINE_string("json", None, "Where to write the JSON record.")
_SEED = flags.DEFINE_integer("seed", 0, "Parameter / data seed.")
_MALLOC = flags.DEFINE_enum("host_malloc", "auto", list(hostmem.MODES),
                            "malloc setting of every case's process, the PyTorch one included "
                            "(free_transformer_jax/hostmem.py, what the launchers use); a variant's "
                            "+host_malloc=... overrides it for that case.")
_TORCH = flags.DEFINE_bool("torch_reference", False, "Also time the baseline in PyTorch "
                           "(transformers' LlamaForCausalLM at the config's shape, AdamW, float32: "
                           "the decoder our HF parity tests match), interleaved with the other "
                           "cases; needs torch and transformers (requirements-test.lock).")

VARIANTS = ("baseline", "free")


def parse_variant(variant: str) -> tuple[str, dict]:
    """``free+latent_bits=12+latent_impl=dense`` -> ("free", {"latent_bits": 12, ...}); values
    are parsed as Python literals where they can be (numbers, True/False), else kept as text."""
    import ast

    kind, *overrides = variant.split("+")
    if kind not in VARIANTS:
        raise ValueError(f"--variants: {variant!r} must start with one of {VARIANTS}")
    fields = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--variants: {item!r} in {variant!r} is not a model_field=value")
        try:
            fields[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fields[name] = value
    return kind, fields


def case_config(config_dict: dict, variant: str, impl: str | None):
    """The experiment config of one case: the latent on or off, the variant's model overrides,
    the attention choice."""
    import ml_collections

    kind, fields = parse_variant(variant)
    c = ml_collections.ConfigDict(config_dict)
    c.model.latent = kind == "free"
    for name, value in fields.items():
        if name == "host_malloc" and value not in hostmem.MODES:
            raise ValueError(f"--variants: {variant!r}: host_malloc must be "
                             f"{', '.join(hostmem.MODES[:-1])} or {hostmem.MODES[-1]}")
        if name.startswith("xla_") or name == "host_malloc":  # the case's process: _worker
            continue
        if name not in c.model:
            raise ValueError(f"--variants: {variant!r}: the config has no model.{name}")
        c.model[name] = value
    if impl:
        c.model.attention_impl = impl
    return c


def xla_flags_of(variant: str) -> str:
    """The ``xla_*`` fields of a variant as XLA_FLAGS text (Python booleans as XLA's true/false)."""
    _, fields = parse_variant(variant)
    text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)
    return " ".join(f"--{k}={text(v)}" for k, v in fields.items() if k.startswith("xla_"))


def _host_batch(abstract: dict, vocab: int, seed: int) -> dict:
    """Random tokens, one document per row, for every array of the program's batch."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in abstract.items():
        b, t = spec.shape[:2]
        if name in ("inputs", "targets"):
            out[name] = rng.integers(0, vocab, spec.shape).astype(spec.dtype)
        elif name == "positions":
            out[name] = np.broadcast_to(np.arange(t), spec.shape).astype(spec.dtype)
        else:  # segment_ids, loss_mask
            out[name] = np.ones(spec.shape, spec.dtype)
    return out


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _serve(conn, setup):
    """A case's worker process: ``setup()`` builds the case and returns (what the parent prints
    and records, ``run(n)``: n steps, blocking until done, ``finish()``: the final record); then
    time ``run`` whenever the parent asks, until it says stop. Errors go back as one line."""
    try:
        info, run, finish = setup()
        conn.send(info)
        while True:
            msg = conn.recv()
            if msg[0] != "run":
                conn.send({"peak_rss_bytes": _peak_rss_bytes(), **finish()})
                return
            t0 = time.perf_counter()
            run(msg[1])
            conn.send({"seconds": (time.perf_counter() - t0) / msg[1]})
    except Exception as e:  # reported by the parent as one line, with the traceback below it
        conn.send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def _jax_case(config_dict: dict, variant: str, impl: str | None, warmup: int, seed: int):
    """One case built by the program builder, compiled and warmed up (see :func:`_serve`)."""
    import jax

    from free_transformer_jax import flops as flops_lib
    from free_transformer_jax.model.config import ModelConfig, resolve_attention_impl
    from free_transformer_jax.train.program import build_program

    config = case_config(config_dict, variant, impl)
    device = jax.devices()[0]
    cfg, line = resolve_attention_impl(
        ModelConfig.from_dict(config.model), device.platform, seq_len=config.data.seq_len,
        packed=config.data.packing != "none")
    config.model.attention_impl = cfg.attention_impl
    t0 = time.perf_counter()
    program = build_program(config)
    compiled = program.lower().compile()
    compile_s = time.perf_counter() - t0
    live = {"state": program.init_state(seed=seed)}
    hostmem.release_free_memory()  # as the trainer does, once compiled and initialised
    abstract = program.abstract_batch()
    batch = jax.device_put(_host_batch(abstract, cfg.vocab_size, seed), program.batch_shardings)

    def run(n):
        for _ in range(n):
            live["state"], live["metrics"] = compiled(live["state"], batch)
        jax.block_until_ready(live["metrics"])

    def finish():
        stats = getattr(device, "memory_stats", lambda: None)() or {}
        return {"device_peak_bytes": stats.get("peak_bytes_in_use"),
                "final_loss": float(live["metrics"]["loss"])}

    run(max(warmup, 1))
    b, t = abstract["inputs"].shape[:2]
    info = {"ready": True, "attention": line, "resolved_impl": cfg.attention_impl,
            "compile_s": compile_s, "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "argument_bytes": compiled.memory_analysis().argument_size_in_bytes,
            "flops_per_token": flops_lib.train_flops_per_token(cfg, t)["total"],
            "tokens_per_step": b * t, "n_devices": len(program.mesh.devices.flat),
            "device_kind": device.device_kind, "platform": device.platform,
            "jax": jax.__version__, "peak_flops_per_device": flops_lib.peak_flops_per_device(device),
            "loss": float(live["metrics"]["loss"])}
    return info, run, finish


def _torch_case(config_dict: dict, warmup: int, seed: int):
    """The PyTorch reference case: the baseline decoder as transformers' Llama (see :func:`_serve`)."""
    import torch
    import transformers

    from free_transformer_jax import flops as flops_lib
    from free_transformer_jax.model.config import ModelConfig

    config = case_config(config_dict, "baseline", None)
    cfg = ModelConfig.from_dict(config.model)
    b, t = int(config.train.batch_size), int(config.data.seq_len)
    torch.manual_seed(seed)
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.resolved_head_dim, intermediate_size=cfg.resolved_ffn_dim,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=t,
        tie_word_embeddings=cfg.tie_embeddings)
    model = transformers.LlamaForCausalLM(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=float(config.optim.lr))
    tokens = torch.randint(0, cfg.vocab_size, (b, t))
    live = {}

    def run(n):
        for _ in range(n):
            loss = model(tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            live["loss"] = float(loss.detach())

    t0 = time.perf_counter()
    run(max(warmup, 1))
    info = {"ready": True, "attention": f"torch {torch.__version__} "
            f"{model.config._attn_implementation}, {torch.get_num_threads()} threads",
            "resolved_impl": "torch", "compile_s": time.perf_counter() - t0,
            "temp_bytes": None, "argument_bytes": None,
            "flops_per_token": flops_lib.train_flops_per_token(cfg.replace(latent=False),
                                                               t)["total"],
            "tokens_per_step": b * t, "n_devices": 1, "device_kind": "cpu", "platform": "cpu",
            "jax": None, "peak_flops_per_device": flops_lib.measure_cpu_peak(),
            "loss": live["loss"]}
    return info, run, lambda: {"device_peak_bytes": None, "final_loss": live["loss"]}


def _with_malloc(mode: str, setup):
    """``setup`` run after this case process's host memory setting (free_transformer_jax/hostmem.py:
    before jax or torch starts a thread), with the setting's line added to what it reports."""
    def wrapped():
        line = hostmem.configure(mode)
        info, run, finish = setup()
        return {**info, "host_malloc": line}, run, finish
    return wrapped


def _worker(conn, config_dict: dict, variant: str, impl: str | None, warmup: int, seed: int,
            malloc: str):
    extra = xla_flags_of(variant)  # before jax (imported by the case) creates its backend
    if extra:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip()
    mode = parse_variant(variant)[1].get("host_malloc", malloc)
    _serve(conn, _with_malloc(mode, lambda: _jax_case(config_dict, variant, impl, warmup, seed)))


def _torch_worker(conn, config_dict: dict, warmup: int, seed: int, malloc: str):
    _serve(conn, _with_malloc(malloc, lambda: _torch_case(config_dict, warmup, seed)))


def summarize(cases: list[dict]) -> dict:
    """Median and spread per case; FT/baseline time and analytic FLOP ratios per attention."""
    for c in cases:
        times = c["round_seconds"]
        med = statistics.median(times)
        c["median_s"] = med
        c["spread"] = (max(times) - min(times)) / med if med else float("nan")
        c["tokens_per_s"] = c["tokens_per_step"] / med
        peak = c["peak_flops_per_device"]
        c["mfu"] = c["tokens_per_s"] * c["flops_per_token"] / (c["n_devices"] * peak) if peak else None
    ratios = {}
    torch_case = next((c for c in cases if c["variant"] == "pytorch"), None)
    for impl in dict.fromkeys(c["impl"] for c in cases if c["variant"] != "pytorch"):
        by = {c["variant"]: c for c in cases if c["impl"] == impl}
        base = by.get("baseline")
        for name, c in by.items():
            if base is not None and name != "baseline":
                ratios.setdefault(impl, {})[name] = {
                    "time_ratio": c["median_s"] / base["median_s"],
                    "flop_ratio": c["flops_per_token"] / base["flops_per_token"],
                    "extra_peak_rss_gb": (c["peak_rss_bytes"] - base["peak_rss_bytes"]) / 1e9,
                    "extra_temp_gb": (c["temp_bytes"] - base["temp_bytes"]) / 1e9}
        if torch_case and "baseline" in by:
            ratios.setdefault(impl, {})["baseline_speed_vs_pytorch"] = (
                torch_case["median_s"] / by["baseline"]["median_s"])
    return ratios


def _table(cases: list[dict], ratios: dict) -> str:
    gb = lambda x: "-" if x is None else f"{x / 1e9:.2f}"
    width = max([24] + [len(c["variant"]) + len(c["impl"]) + 12 for c in cases])
    lines = [f"{'case':{width}s} {'median ms':>9s} {'spread':>7s} {'tok/s':>9s} {'MFU':>6s} "
             f"{'temp GB':>8s} {'RSS GB':>7s} {'dev GB':>7s}"]
    for c in cases:
        mfu = "-" if c["mfu"] is None else f"{100 * c['mfu']:.1f}%"
        name = c["impl"] if c["impl"] == c["resolved_impl"] else f"{c['impl']}->{c['resolved_impl']}"
        lines.append(f"{c['variant'] + '/' + name:{width}s} {1e3 * c['median_s']:9.1f} "
                     f"{100 * c['spread']:6.1f}% {c['tokens_per_s']:9.0f} {mfu:>6s} "
                     f"{gb(c['temp_bytes']):>8s} {gb(c['peak_rss_bytes']):>7s} "
                     f"{gb(c['device_peak_bytes']):>7s}")
    for impl, r in ratios.items():
        for name, v in r.items():
            if isinstance(v, dict):
                lines.append(f"{name}/baseline [{impl}]: time {v['time_ratio']:.3f} (analytic FLOP "
                             f"ratio {v['flop_ratio']:.3f}), peak RSS "
                             f"{v['extra_peak_rss_gb']:+.2f} GB, temporaries "
                             f"{v['extra_temp_gb']:+.2f} GB")
        if "baseline_speed_vs_pytorch" in r:
            lines.append(f"baseline [{impl}] tokens/s vs PyTorch's: "
                         f"{r['baseline_speed_vs_pytorch']:.3f}x")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _VARIANTS.value:
        sys.exit(f"error: --variants is empty: give one or more of {VARIANTS}")
    for v in _VARIANTS.value:
        try:
            case_config(_CONFIG.value.to_dict(), v, None)
        except ValueError as e:
            sys.exit(f"error: {e}")
    config = _CONFIG.value
    impls = _IMPLS.value or [config.model.attention_impl]
    impls = list(dict.fromkeys(impls))
    cases = [{"variant": v, "impl": i} for i in impls for v in _VARIANTS.value]
    if _TORCH.value:
        cases.append({"variant": "pytorch", "impl": "torch"})
    ctx = mp.get_context("spawn")
    conf = config.to_dict()
    print(f"step_time: {len(cases)} cases, {_REPEATS.value} rounds x {_STEPS.value} steps, "
          f"batch {config.train.batch_size} x {config.data.seq_len}", flush=True)
    try:
        for c in cases:  # built one at a time: compile times and memory are each case's own
            parent, child = ctx.Pipe()
            if c["variant"] == "pytorch":
                c["process"] = ctx.Process(target=_torch_worker,
                                           args=(child, conf, _WARMUP.value, _SEED.value,
                                                 _MALLOC.value))
            else:
                c["process"] = ctx.Process(target=_worker, args=(child, conf, c["variant"],
                                                                 c["impl"], _WARMUP.value,
                                                                 _SEED.value, _MALLOC.value))
            c["process"].start()
            c["conn"] = parent
            info = parent.recv()
            if "error" in info:
                print(info["traceback"], file=sys.stderr)
                sys.exit(f"error: {c['variant']}/{c['impl']}: {info['error']}")
            c.update(info)
            print(f"  {c['variant']} {info['attention']}; compiled in {info['compile_s']:.1f} s; "
                  f"{info['host_malloc']}", flush=True)
        for c in cases:
            c["round_seconds"] = []
        for r in range(_REPEATS.value):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            for c in order:
                c["conn"].send(("run", _STEPS.value))
                c["round_seconds"].append(c["conn"].recv()["seconds"])
        for c in cases:
            c["conn"].send(("stop",))
            c.update(c["conn"].recv())
    finally:
        for c in cases:
            if "process" in c:
                c["process"].join(timeout=60)
                if c["process"].is_alive():
                    c["process"].terminate()
    for c in cases:
        del c["process"], c["conn"]
    ratios = summarize(cases)
    print(_table(cases, ratios))
    record = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "argv": sys.argv, "host": platform_lib.node(), "cpu_count": os.cpu_count(),
              "steps_per_round": _STEPS.value, "rounds": _REPEATS.value,
              "config": json.loads(config.to_json_best_effort()), "cases": cases, "ratios": ratios}
    path = _JSON.value or os.path.join(os.environ.get("OUT", "."), "step_time.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
