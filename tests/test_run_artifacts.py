"""Every run leaves a learning-curve PNG and TensorBoard events (`fedjax_llm.run_artifacts`)."""

from __future__ import annotations

import glob
import os
import struct
import warnings

import numpy as np
import pytest

from fedjax_llm import simulate
from fedjax_llm.run_artifacts import (
    LEARNING_CURVES,
    ArtifactWarning,
    TensorBoardWriter,
    _import_tensorboardx,
    loss_keys,
    write_learning_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: str) -> list:
    """Reads a TensorBoard event file (TFRecord framing, CRCs checked) into Event protos."""
    _, (event_class, _), _ = _import_tensorboardx()
    data = open(path, "rb").read()
    events, i = [], 0
    while i < len(data):
        header = data[i : i + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8 : i + 12])[0] == _masked_crc(header)
        body = data[i + 12 : i + 12 + length]
        assert struct.unpack("<I", data[i + 12 + length : i + 16 + length])[0] == _masked_crc(body)
        events.append(event_class.FromString(body))
        i += 16 + length
    return events


def scalars(events: list) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every scalar in the events."""
    out: dict[str, dict[int, float]] = {}
    for event in events:
        for value in event.summary.value:
            out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_a_run_leaves_learning_curves_and_tensorboard_scalars(make_config):
    config = make_config(run={"num_rounds": 3}, eval={"every": 2, "max_new_tokens": 0})
    history = simulate(config)
    run_dir = config.run.output_dir

    png = os.path.join(run_dir, LEARNING_CURVES)
    assert open(png, "rb").read(8) == PNG_SIGNATURE
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (450, 800)

    (event_file,) = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    events = read_events(event_file)
    assert events[0].file_version == "brain.Event:2"
    found = scalars(events)
    train = {h["round"]: h["train_loss"] for h in history if "train_loss" in h}
    assert sorted(found["train_loss"]) == [1, 2, 3]
    for step, value in train.items():
        assert found["train_loss"][step] == np.float32(value)
    evals = {h["round"]: h["eval/loss"] for h in history if "eval/loss" in h}
    assert sorted(found["eval/loss"]) == sorted(evals) == [0, 2, 3]
    assert found["eval/loss"][3] == np.float32(evals[3])
    # Wall times are the records' timestamps; non-numeric values are not scalars.
    by_step = {e.step: e for e in events if e.summary.value}
    assert by_step[3].wall_time == pytest.approx(history[-1]["time"])
    assert "round" not in found and "time" not in found


def test_a_resumed_writer_purges_the_replaced_steps(tmp_path):
    writer = TensorBoardWriter(tmp_path, purge_step=5)
    writer.write({"round": 5, "train_loss": 1.5, "note": "text", "flag": True, "xs": [1, 2]})
    writer.close()
    writer.close()  # closing twice is harmless
    (event_file,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    events = read_events(event_file)
    starts = [e for e in events if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in starts] == [(5, 1)]  # SessionLog.START
    assert scalars(events) == {"train_loss": {5: 1.5}}


def test_writers_started_together_do_not_share_a_file(tmp_path):
    first, second = TensorBoardWriter(tmp_path), TensorBoardWriter(tmp_path)
    first.write({"round": 1, "train_loss": 1.0})
    second.write({"round": 2, "train_loss": 2.0})
    first.close()
    second.close()
    assert first.path != second.path
    files = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    found = sorted((scalars(read_events(f))["train_loss"] for f in files), key=list)
    assert found == [{1: 1.0}, {2: 2.0}]


def test_failures_to_write_are_warnings_not_errors(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the run directory should be")
    with pytest.warns(ArtifactWarning, match="could not start TensorBoard events"):
        writer = TensorBoardWriter(blocked / "run")
    assert writer.path is None
    writer.write({"round": 1, "train_loss": 1.0})  # a no-op, not an error
    writer.close()

    writer = TensorBoardWriter(tmp_path / "ok")
    writer._writer._py_recordio_writer._writer.close()  # the disk goes away under the writer
    with pytest.warns(ArtifactWarning, match="could not write TensorBoard events"):
        writer.write({"round": 1, "train_loss": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        writer.write({"round": 2, "train_loss": 1.0})  # off after the first failure: silent
        writer.close()

    with pytest.warns(ArtifactWarning, match="could not write the learning curves"):
        assert write_learning_curves([{"round": 1, "train_loss": 1.0}], blocked / "x.png") is None


def test_learning_curves_draw_every_evaluated_loss(tmp_path):
    history = [
        {"round": 0, "eval/loss": 5.0, "eval/perplexity": 148.0, "client/loss_mean": 5.1},
        {"round": 1, "train_loss": 4.0},
        {"round": 2, "train_loss": 3.0, "eval/loss": 3.2, "client/loss_mean": 3.1},
    ]
    assert loss_keys(history) == ["eval/loss", "client/loss_mean"]
    path = write_learning_curves(history, tmp_path / "sub" / "curves.png", title="t")
    assert path == str(tmp_path / "sub" / "curves.png")
    assert open(path, "rb").read(8) == PNG_SIGNATURE
    # A history without losses still gives a (labelled, empty) figure.
    assert write_learning_curves([{"round": 0}], tmp_path / "empty.png") is not None
