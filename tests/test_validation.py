"""Hostile inputs: each ends in one line naming the problem and the fix (or works), before anything
is compiled. Subprocesses only where the error comes from flag parsing."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from free_transformer_jax import configlib, fs
from free_transformer_jax import evaluate as eval_lib
from free_transformer_jax.checkpoint import Checkpointer
from free_transformer_jax.data import local_tfds
from free_transformer_jax.data.tokenizers import ByteTokenizer, SyntheticTokenizer
from free_transformer_jax.generate import PromptError, encode_prompts
from free_transformer_jax.model.config import ConfigError
from free_transformer_jax.train.optimizer import make_optimizer, validate_optim
from free_transformer_jax.train.state import TrainState
from free_transformer_jax.trainer import train
from helpers import tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import common  # noqa: E402  (launch/common.py)


def one_line_exit(fn, *args) -> str:
    """Runs ``fn``, which must exit with one ``error: ...`` line; returns that line."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


# Choice-task files ---------------------------------------------------------------------------------

GOOD = {"context": "A>", "choices": ["AB", "CD"], "label": 1}


@pytest.mark.parametrize("line,expected", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "a JSON list, not an object"),
    (json.dumps({"context": "A>", "choices": ["x", "y"]}), r"missing field\(s\) \['label'\]"),
    (json.dumps({**GOOD, "context": 3}), '"context" is a int, not a string'),
    (json.dumps({**GOOD, "choices": "AB"}), '"choices" must be a list'),
    (json.dumps({**GOOD, "choices": ["AB", 7]}), "choice 1 is 7, not a non-empty string"),
    (json.dumps({**GOOD, "label": "1"}), "\"label\" is '1', not an integer"),
    (json.dumps({**GOOD, "label": True}), '"label" is True, not an integer'),
    (json.dumps({**GOOD, "label": 2}), "label 2 out of range for 2 choices"),
    (json.dumps({**GOOD, "label": -1}), "label -1 out of range"),
])
def test_malformed_choice_task_lines_name_the_line(tmp_path, line, expected):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(eval_lib.ChoiceTaskError, match=expected) as e:
        eval_lib.read_choice_task(str(path))
    assert str(e.value).startswith(f"{path}:3: ") and "\n" not in str(e.value)


def test_empty_missing_and_unencodable_choice_tasks(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(eval_lib.ChoiceTaskError, match="no examples"):  # never a NaN accuracy
        eval_lib.read_choice_task(str(empty))
    with pytest.raises(fs.FsError, match="--choice_task=.*nope.jsonl: no such file"):
        eval_lib.read_choice_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(fs.FsError, match="is a directory"):
        eval_lib.read_choice_task(str(tmp_path))
    # a context outside the synthetic alphabet fails before the model runs (params=None)
    bad = [{"context": "a>", "choices": ["AB", "CD"], "label": 0}]
    with pytest.raises(eval_lib.ChoiceTaskError, match="example 0 context: character 'a'"):
        eval_lib.score_choices(None, None, bad, SyntheticTokenizer(), key=jax.random.key(0))
    assert len(eval_lib.read_choice_task(os.path.join(ROOT, "data", "tasks",
                                                      "synthetic_choice.jsonl"))) == 200


# Corpora for prepare_data ---------------------------------------------------------------------------

def test_corpus_checks(tmp_path):
    (tmp_path / "only.txt").write_text("a single document\n\nin two blocks\n")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    skipped = []
    docs = list(local_tfds.read_text_files(local_tfds.expand_globs([str(tmp_path / "*")]),
                                           skipped=skipped))
    assert docs == ["a single document\n\nin two blocks\n"]  # no U+FFFD corpus from the image
    assert skipped == [str(tmp_path / "img.png")]
    with pytest.raises(local_tfds.CorpusError, match="1 non-empty document.*--by_paragraph"):
        local_tfds.split_documents(docs)
    by_block = local_tfds.split_documents(local_tfds.read_text_files(
        [tmp_path / "only.txt"], by_paragraph=True))  # the suggested fix works
    assert len(by_block["train"]) == len(by_block["validation"]) == 1
    with pytest.raises(local_tfds.CorpusError, match="--text_files: no files match"):
        local_tfds.expand_globs([str(tmp_path / "*.md")])
    jsonl = tmp_path / "c.jsonl"
    for content, expected in [(b'{"text": "ok"}\n{"text": 5}\n', ":2: 'text' is a int"),
                              (b'{"text": "ok"}\n"just a string"\n', ":2: a JSON str"),
                              (b'{"text": "ok"}\n{"text": "\xff"}\n', ":2: not UTF-8"),
                              (b'{"body": "ok"}\n', ":1: no key 'text'.*--text_key")]:
        jsonl.write_bytes(content)
        with pytest.raises(local_tfds.CorpusError, match=expected):
            list(local_tfds.read_jsonl_files([str(jsonl)]))
    with pytest.raises(local_tfds.CorpusError, match="validation_fraction"):
        local_tfds.split_documents(["a", "b"], validation_fraction=0.0)


# Optimizer, resume, workdir, prompts -----------------------------------------------------------------

def test_invalid_optim_values_are_refused():
    base = dict(tiny_train_config().optim)
    for field, value, expected in [("lr", -3e-4, "optim.lr=-0.0003: must be > 0"),
                                   ("lr", 0.0, "optim.lr=0.0: must be > 0"),
                                   ("lr", float("nan"), "finite"),
                                   ("b2", 1.0, "optim.b2=1.0: must be in \\[0, 1\\)"),
                                   ("eps", 0.0, "optim.eps"),
                                   ("warmup_steps", -1, "optim.warmup_steps"),
                                   ("min_lr_ratio", 2.0, "optim.min_lr_ratio"),
                                   ("grad_clip", -1.0, "optim.grad_clip"),
                                   ("weight_decay", -0.1, "optim.weight_decay"),
                                   ("schedule", "linear", "optim.schedule='linear'")]:
        with pytest.raises(ConfigError, match=expected):
            validate_optim({**base, field: value})
        with pytest.raises(ConfigError):
            make_optimizer({**base, field: value}, 10)
    validate_optim(base)


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A workdir with a step-3 checkpoint and its config.json. The check runs before the state is
    restored, so a stand-in state (nothing to initialise or compile) is enough."""
    wd = str(tmp_path_factory.mktemp("resume") / "run")
    c = tiny_train_config(steps=6)
    state = TrainState(step=jnp.asarray(3, jnp.int32), params={"w": jnp.zeros(2)},
                       opt_state={"count": jnp.zeros((), jnp.int32)})
    ck = Checkpointer(wd, async_save=False)
    ck.save(3, state, config=c.to_dict())
    ck.close()
    fs.write_json(fs.join(wd, "config.json"), c.to_dict())
    return wd, c


def test_resuming_with_another_seq_len_is_refused(resumable):
    wd, c = resumable
    before = fs.read_text(fs.join(wd, "config.json"))
    other = tiny_train_config(steps=6)
    other.data.seq_len = 130
    other.optim.lr = 1e-3
    with pytest.raises(ConfigError) as e:
        train(other, wd)  # refused before any restore or compilation
    msg = str(e.value)
    assert "data.seq_len: 65 -> 130" in msg and "optim.lr: 0.003 -> 0.001" in msg
    assert "new --workdir" in msg and "\n" not in msg
    assert fs.read_text(fs.join(wd, "config.json")) == before  # not silently rewritten
    # fields that may change on resume pass the check
    longer = tiny_train_config(steps=9)
    longer.train.log_every = 1
    longer.mesh.fsdp = 2
    longer.eval.batches = 1
    configlib.check_resume(wd, longer.to_dict())
    assert configlib.resume_changes(c.to_dict(), longer.to_dict()) == []
    # the worker count sets the batch order and the data state's layout: fixed once saved
    workers = tiny_train_config(steps=6)
    workers.data.num_workers = c.data.num_workers + 2
    with pytest.raises(ConfigError, match=rf"data\.num_workers: {c.data.num_workers} -> "):
        configlib.check_resume(wd, workers.to_dict())


def test_resume_reads_fields_the_recorded_config_lacks_as_defaults():
    """A run recorded before a field existed ran with that field's default behaviour: resuming it
    with the default passes, with another value is refused; a field the code dropped is ignored."""
    c = tiny_train_config()
    recorded = json.loads(json.dumps(c.to_dict()))
    del recorded["model"]["free_bits_scope"]  # as if config.json predates the field
    recorded["model"]["a_field_the_code_dropped"] = 3
    assert configlib.resume_changes(recorded, c.to_dict()) == []
    c.model.free_bits_scope = "batch"
    assert configlib.resume_changes(recorded, c.to_dict()) == ["model.free_bits_scope: 'token' -> "
                                                               "'batch'"]


def test_workdir_under_a_regular_file(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(fs.FsError, match=f"--workdir={blocker}/run: {blocker} is a file, not a "
                       "directory"):
        train(tiny_train_config(), str(blocker / "run"))
    with pytest.raises(fs.FsError, match="is a file, not a directory"):
        fs.write_json(str(blocker / "out.json"), {})


def test_prompts_outside_the_alphabet():
    with pytest.raises(PromptError, match="prompt 1 'k>': character 'k' is not in the synthetic "
                       "alphabet"):
        encode_prompts(SyntheticTokenizer(), ["K>", "k>"])
    with pytest.raises(PromptError, match="prompt 0 is empty"):
        encode_prompts(SyntheticTokenizer(), [""])
    assert encode_prompts(ByteTokenizer(), ["é"]) == [[257, 195, 169]]


# Flags and config files ------------------------------------------------------------------------------

def _parse(*args):
    """parse_flags on fresh flag values shaped like a launcher's (a config file, a bounded int)."""
    argv = ["launcher", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_integer("num_samples", 4, "n", lower_bound=1, flag_values=fv)
    common.parse_flags(argv, fv)
    return fv


def test_config_flag_errors_are_one_line(tmp_path):
    demo = "--config=" + os.path.join(ROOT, "configs", "demo.py")
    msg = one_line_exit(_parse, demo, "--config.model.kapa_bits=1")
    assert "--config.model.kapa_bits: the config has no field 'kapa_bits'; did you mean " \
           "'kappa_bits'?" in msg
    msg = one_line_exit(_parse, demo, "--config.optimm.lr=1")
    assert "--config.optimm.lr: the config has no field 'optimm'; did you mean 'optim'?" in msg
    msg = one_line_exit(_parse, "--config=configs/nope.py")
    assert "--config=configs/nope.py: no such config file" in msg
    msg = one_line_exit(_parse, demo, "--config.optim.lr=abc")
    assert "--config.optim.lr=abc" in msg
    msg = one_line_exit(_parse, demo, "--num_samples=0")
    assert "--num_samples=0: 0 is not a positive integer" in msg
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    raise ValueError('boom')\n")
    msg = one_line_exit(_parse, f"--config={raising}")
    assert msg.endswith("Error whilst parsing config file: ValueError: boom"), msg
    assert _parse(demo, "--config.optim.lr=0.5").config.optim.lr == 0.5


def test_user_errors_in_main_are_one_line_and_bugs_keep_their_traceback():
    def bad_config(argv):
        raise ConfigError("model.d_model=0: must be a positive integer")

    assert one_line_exit(common.guard(bad_config), []) == \
        "error: model.d_model=0: must be a positive integer"

    def bug(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        common.guard(bug)([])


def _launch(script, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_launchers_fail_in_one_line_before_loading_anything(tmp_path):
    r = _launch("sample.py", f"--workdir={tmp_path}", "--prompt=K>", "--num_samples=0")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        r.stderr.strip()] and "error: flag --num_samples=0" in r.stderr, r.stderr
    r = _launch("train.py", "--config=configs/demo.py", f"--workdir={tmp_path}",
                "--config.model.kapa_bits=1")
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: --config.model.kapa_bits: the config has no field 'kapa_bits'; did you mean "
        "'kappa_bits'? (run with --helpfull to list the fields)"), r.stderr
