"""Every file outside Orbax goes through fs.py: a fake gs:// filesystem (fsspec in memory, registered
for the gs scheme that etils.epath hands to fsspec) receives config.json, TensorBoard events, eval
results and task files, and nothing lands on the local disk instead."""

import json
import os
import struct

import fsspec
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from free_transformer_jax import checkpoint as ckpt_lib
from free_transformer_jax import configlib, fs
from free_transformer_jax import evaluate as eval_lib
from free_transformer_jax.data import choice_task, local_tfds
from free_transformer_jax.model.config import ConfigError
from free_transformer_jax.trainer import train
from helpers import tiny_train_config


class FakeGCS(MemoryFileSystem):
    """An in-memory object store answering for gs:// (and gcs://) URLs."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        path = path.strip("/")
        return "/" + path if path else ""


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """The fake store, empty; the test runs in an empty cwd so a path mistaken for a local one
    would show up there."""
    saved = {k: fsspec.registry.get(k) for k in ("gs", "gcs")}
    for scheme in ("gs", "gcs"):
        fsspec.register_implementation(scheme, FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    monkeypatch.chdir(tmp_path)
    yield FakeGCS.store
    assert os.listdir(tmp_path) == []  # nothing written to a local "gs:" directory
    for scheme, cls in saved.items():
        if cls is not None:
            fsspec.register_implementation(scheme, cls, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def test_paths_json_and_globs_on_the_fake_store(gcs):
    assert fs.is_remote("gs://b/x") and not fs.is_remote("/tmp/x")
    assert fs.join("gs://b/run", "config.json") == "gs://b/run/config.json"
    fs.makedirs("gs://b/run", "--workdir")
    fs.write_json("gs://b/run/a.json", {"x": 1})
    assert json.loads(gcs["/b/run/a.json"].getvalue()) == {"x": 1}  # in the store, not on disk
    assert fs.read_json("gs://b/run/a.json") == {"x": 1}
    fs.write_text("gs://b/run/c.jsonl", '{"text": "doc one"}\n{"text": "doc two"}\n')
    assert fs.glob("gs://b/run/*.json*") == ["gs://b/run/a.json", "gs://b/run/c.jsonl"]
    assert list(local_tfds.read_jsonl_files(local_tfds.expand_globs(["gs://b/run/*.jsonl"]))) == [
        "doc one", "doc two"]
    with pytest.raises(fs.FsError, match="--x=gs://b/nope.json: no such file"):
        fs.read_json("gs://b/nope.json", "--x")
    with pytest.raises(fs.FsError, match="unsupported scheme 'ftp'"):
        fs.path("ftp://host/x")


def test_choice_task_and_eval_results_on_the_fake_store(gcs):
    task = "gs://b/tasks/choice.jsonl"
    choice_task.write_jsonl(task, choice_task.make_examples(3))
    examples = eval_lib.read_choice_task(task)
    assert len(examples) == 3 and all(0 <= ex["label"] < 4 for ex in examples)
    results = {"step": 7, "elbo": 1.25, "model": "free_transformer",
               "choice_task": {"accuracy": 0.5, "accuracy_norm": 0.25}}
    eval_lib.write_results(results, "gs://b/run/eval_step7.json", logdir="gs://b/run")
    assert json.loads(gcs["/b/run/eval_step7.json"].getvalue()) == results
    events = [k for k in gcs if k.startswith("/b/run/events.out.tfevents.")]
    assert len(events) == 1
    data = gcs[events[0]].getvalue()
    length = struct.unpack("<Q", data[:8])[0]  # a well-formed TFRecord stream
    assert len(data) > 12 + length and b"eval/elbo" in data and b"eval/choice_accuracy" in data


class _Stop(Exception):
    pass


def test_training_writes_config_and_events_to_the_remote_workdir(gcs, tmp_path_factory, monkeypatch):
    """train() on gs://: config.json and TensorBoard events go to the store. Checkpoints (Orbax
    and TensorStore have their own gs:// clients) are redirected to a local directory, and the
    first batch stops the run, so the train step is never compiled."""
    from free_transformer_jax import data as data_lib

    local = str(tmp_path_factory.mktemp("ckpt"))
    real = ckpt_lib.Checkpointer
    monkeypatch.setattr(ckpt_lib, "Checkpointer", lambda workdir, **kw: real(local, **kw))

    class Stopper:
        def __next__(self):
            raise _Stop

        def close(self):  # the trainer closes its iterator
            pass

    monkeypatch.setattr(data_lib, "make_iterator", lambda *a, **kw: Stopper())
    c = tiny_train_config(steps=2)
    with pytest.raises(_Stop):
        train(c, "gs://b/run")
    assert json.loads(gcs["/b/run/config.json"].getvalue())["model"]["d_model"] == 32
    assert [k for k in gcs if k.startswith("/b/run/events.out.tfevents.")]
    # resuming reads the recorded config back from the store and refuses a changed field
    c2 = tiny_train_config(steps=4)
    configlib.check_resume("gs://b/run", c2.to_dict())  # train.steps may change
    c2.train.seed = 5
    with pytest.raises(ConfigError, match="train.seed: 0 -> 5"):
        configlib.check_resume("gs://b/run", c2.to_dict())
