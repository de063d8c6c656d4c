"""What a run leaves behind and shuts down: hyperparameters in TensorBoard, the data iterator
closed and the profiler trace stopped even when training fails, and the console log filter."""

import glob
import logging as std_logging
import os
import struct

import jax
import pytest
from absl import logging

from free_transformer_jax import trainer
from free_transformer_jax.logs import LibraryChatterFilter
from helpers import tiny_train_config


def read_events(path):
    """The Event protos of one TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            events.append(Event.FromString(f.read(length)))
            f.read(4)
    return events


class FailingBatches:
    """Wraps the training iterator: fails at batch ``fail_at`` and records ``close()``."""

    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.served, self.closed = inner, fail_at, 0, False

    def __next__(self):
        if self.served == self.fail_at:
            raise RuntimeError("data source went away")
        self.served += 1
        return next(self.inner)

    def close(self):
        self.closed = True
        self.inner.close()


def test_failed_run_closes_iterator_stops_trace_and_logged_hyperparameters(tmp_path, monkeypatch):
    made = []
    real = trainer._train_batches

    def failing(config):
        made.append(FailingBatches(real(config), fail_at=4))
        return made[-1]

    monkeypatch.setattr(trainer, "_train_batches", failing)
    c = tiny_train_config(steps=8)
    c.train.ckpt_every = 100  # no checkpoint before the failure: nothing to save with the data state
    c.train.profile_steps = 10  # the trace (from the third step) would run past the failure
    workdir = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="data source went away"):
        trainer.train(c, workdir)
    assert made[0].served == 4 and made[0].closed
    # the trace was stopped (and written) in a finally: a new one can start
    assert glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
    jax.profiler.start_trace(str(tmp_path / "again"))
    jax.profiler.stop_trace()

    (events_file,) = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    summaries = [(e.step, v) for e in read_events(events_file) for v in e.summary.value]
    text = [(step, v) for step, v in summaries if v.tag.startswith("hyperparameters")]
    assert len(text) == 1 and text[0][0] == 0
    table = text[0][1].tensor.string_val[0].decode()
    assert "| model.d_model | 32 |" in table and "| train.profile_steps | 10 |" in table
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    (session,) = [v for _, v in summaries if v.tag == "_hparams_/session_start_info"]
    data = HParamsPluginData.FromString(session.metadata.plugin_data.content)
    assert data.session_start_info.hparams["optim.lr"].number_value == pytest.approx(c.optim.lr)
    assert data.session_start_info.hparams["data.source"].string_value == "synthetic"
    # the steps before the failure were reported
    assert any(v.tag == "train/loss" and step == 2 for step, v in summaries)


def _record(pathname, level=std_logging.INFO):
    return std_logging.LogRecord("absl", level, pathname, 1, "msg", (), None)


def test_library_chatter_needs_verbosity_one():
    f = LibraryChatterFilter()
    orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
    ours = "/work/free_transformer_jax/trainer.py"
    old = logging.get_verbosity()
    try:
        logging.set_verbosity(logging.INFO)
        assert not f.filter(_record(orbax))
        assert f.filter(_record(orbax, std_logging.WARNING))  # warnings always show
        assert f.filter(_record(ours))
        assert f.filter(_record("/x/orbax_like_name/y.py"))  # a directory must match exactly
        logging.set_verbosity(logging.DEBUG)  # -v=1
        assert f.filter(_record(orbax))
    finally:
        logging.set_verbosity(old)
