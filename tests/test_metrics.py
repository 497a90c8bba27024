"""Tests of fedjax_llm/metrics.py: the JSONL metrics writer, reading it back, the progress display
and the summary table."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from rich.console import Console

from fedjax_llm.metrics import MetricsWriter, RoundProgress, read_jsonl, summary_table

RECORDS = [
    {"round": 1, "train/loss": 2.5, "eval/perplexity": 12.25},
    {"round": 2, "train/loss": 1.75, "tags": ["a", "b"], "nested": {"x": 1}},
]


def untimed(records: list[dict]) -> list[dict]:
    """The records without the writer's timestamp, after checking that each has one."""
    for record in records:
        assert isinstance(record["time"], float)
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_writer_flushes_every_record_before_close(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"  # the directory does not exist yet
    writer = MetricsWriter(str(path))
    try:
        for i, record in enumerate(RECORDS):
            writer.write(dict(record))
            # Readable from another handle at once: nothing waits for close().
            assert untimed(read_jsonl(str(path))) == RECORDS[: i + 1]
    finally:
        writer.close()
    lines = path.read_text().splitlines()
    assert untimed([json.loads(line) for line in lines]) == RECORDS


def test_writer_without_history_appends_to_an_existing_file(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    first = MetricsWriter(path)
    first.write(dict(RECORDS[0]))
    first.close()
    second = MetricsWriter(path)
    second.write(dict(RECORDS[1]))
    second.close()
    assert untimed(read_jsonl(path)) == RECORDS


def test_resume_rewrites_the_file_with_exactly_the_restored_history(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    writer = MetricsWriter(path)
    for r in range(1, 6):  # the run died after round 5; its checkpoint was at round 2
        writer.write({"round": r})
    writer.close()

    history = [{"round": 1}, {"round": 2}]
    resumed = MetricsWriter(path, history=history)
    assert read_jsonl(path) == history
    resumed.write({"round": 3})
    resumed.close()
    back = read_jsonl(path)
    assert back[:2] == history  # written as given: no timestamp added to the history
    assert untimed(back[2:]) == [{"round": 3}]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()

    # An empty history (resume at round 0) empties the file.
    MetricsWriter(path, history=[]).close()
    assert read_jsonl(path) == []


def test_read_jsonl_round_trip_skips_blank_lines_and_keeps_non_finite_floats(tmp_path):
    records = [*RECORDS, {"round": 3, "train/loss": math.inf, "grad_norm": -math.inf}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n  \n")
    writer = MetricsWriter(str(path))
    writer.write(dict(records[2]))
    writer.write({"loss": math.nan})
    writer.close()
    back = read_jsonl(str(path))
    assert back[:2] == records[:2]
    assert untimed(back[2:3]) == records[2:3]
    assert math.isnan(back[3]["loss"])


def render(table) -> str:
    console = Console(record=True, width=120, color_system=None)
    console.print(table)
    return console.export_text()


def test_summary_table_renders_the_keys_present():
    before = {"eval/loss": 3.14159265, "eval/perplexity": 23.1406926, "round": 0}
    after = {"eval/loss": 1.0 / 3.0, "eval/perplexity": math.inf, "extra": "only after"}
    table = summary_table(
        before, after, ["eval/loss", "eval/perplexity", "missing", "extra"], "Summary"
    )
    assert table.row_count == 3  # a key in neither dict gets no row
    text = render(table)
    assert "Summary" in text
    for key in ("eval/loss", "eval/perplexity", "extra"):
        assert key in text
    assert "missing" not in text
    assert "round" not in text  # only the keys asked for
    # Floats show 4 significant digits; inf prints as is.
    assert "3.142" in text and "0.3333" in text and "23.14" in text and "inf" in text
    assert "only after" in text


def test_silent_progress_bar_runs_without_output(capsys):
    with RoundProgress(total=3, completed=1, enabled=False) as progress:
        progress.update(2, "loss 1.0")
        progress.log("should not print")
        progress.update(3, "loss 0.5")
    captured = capsys.readouterr()
    assert "should not print" not in captured.out + captured.err


# ------------------------------------------------------------------------------ timestamps


class FakeClock:
    """A clock that only moves when told to, so tests never sleep."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_write_stamps_unix_time_in_place_and_returns_the_record(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    clock = FakeClock(1_700_000_000.123456)
    writer = MetricsWriter(path, clock=clock)
    record = {"round": 1, "train_loss": 2.5}
    assert writer.write(record) is record
    # In place, so a history list holding the dict equals the file, timestamp included.
    assert record == {"round": 1, "train_loss": 2.5, "time": 1_700_000_000.123}
    clock.advance(2.0)
    writer.write(record)  # the same dict again gets the new time, on disk and in the dict
    writer.close()
    back = read_jsonl(path)
    assert [r["time"] for r in back] == [1_700_000_000.123, 1_700_000_002.123]
    assert back[1] == record
    # Flat: the stamp is a plain float next to the metrics, not a nested object.
    assert all(isinstance(v, int | float) for r in back for v in r.values())


def test_real_timestamps_are_present_current_and_monotone(tmp_path):
    import time

    path = str(tmp_path / "metrics.jsonl")
    before = time.time()
    writer = MetricsWriter(path)
    for r in range(20):
        writer.write({"round": r})
    writer.close()
    times = [r["time"] for r in read_jsonl(path)]
    assert len(times) == 20
    assert times == sorted(times)
    assert before - 0.001 <= times[0] <= times[-1] <= time.time() + 0.001


def test_resume_history_keeps_its_original_timestamps(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    clock = FakeClock(100.0)
    writer = MetricsWriter(path, clock=clock)
    history = []
    for r in range(3):
        history.append(writer.write({"round": r}))
        clock.advance(10.0)
    writer.close()
    assert [h["time"] for h in history] == [100.0, 110.0, 120.0]

    clock.advance(1000.0)  # the resumed process starts much later
    resumed = MetricsWriter(path, history=[dict(h) for h in history[:2]], clock=clock)
    resumed.write({"round": 2})
    resumed.close()
    back = read_jsonl(path)
    assert back[:2] == history[:2]  # untouched, original times
    assert back[2] == {"round": 2, "time": 1130.0}


# ------------------------------------------------------------------------------ read_jsonl


def write_lines(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_corrupt_line_names_file_and_line_even_when_partial_lines_are_allowed(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", '{"round": 1}\n\n{"round": 2, "lo\n{"round": 3}\n')
    for allow in (False, True):
        with pytest.raises(ValueError, match=r"m\.jsonl:3: corrupt JSON line") as e:
            read_jsonl(path, allow_partial_last_line=allow)
        assert "allow_partial_last_line" not in str(e.value)  # not a torn write: no such hint


def test_partial_last_line_fails_by_default_and_is_skipped_on_request(tmp_path):
    # A process killed mid-write: the last record is cut short and has no newline.
    path = write_lines(tmp_path / "m.jsonl", '{"round": 1}\n{"round": 2}\n{"round": 3, "tr')
    with pytest.raises(ValueError, match=r"m\.jsonl:3: .*allow_partial_last_line=True"):
        read_jsonl(path)
    assert read_jsonl(path, allow_partial_last_line=True) == [{"round": 1}, {"round": 2}]


def test_bad_last_line_with_a_newline_is_corruption_not_a_torn_write(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", '{"round": 1}\n{"round": 2, "tr\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: corrupt JSON line"):
        read_jsonl(path, allow_partial_last_line=True)


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", '{"round": 1}\n{"round": 2}')
    assert read_jsonl(path, allow_partial_last_line=True) == [{"round": 1}, {"round": 2}]
    assert read_jsonl(path) == [{"round": 1}, {"round": 2}]


def test_a_line_that_is_not_an_object_is_rejected(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", '{"round": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: expected a JSON object"):
        read_jsonl(path)


def test_appending_after_a_torn_line_starts_a_new_line(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", '{"round": 1}\n{"round": 2, "tr')
    writer = MetricsWriter(path)
    writer.write({"round": 2})
    writer.close()
    lines = open(path).read().splitlines()
    assert lines[:2] == ['{"round": 1}', '{"round": 2, "tr']  # the torn record stays visible
    assert untimed([json.loads(lines[2])]) == [{"round": 2}]  # not glued onto it
    with pytest.raises(ValueError, match=r"m\.jsonl:2: corrupt JSON line"):
        read_jsonl(path, allow_partial_last_line=True)  # now in the middle: corruption


# ------------------------------------------------------------------------------ progress


def plain(total: int = 60, completed: int = 0, **kwargs):
    stream = io.StringIO()
    clock = FakeClock(1000.0)
    progress = RoundProgress(total, completed, stream=stream, clock=clock, **kwargs)
    return progress, stream, clock


def test_auto_mode_is_plain_off_a_terminal_and_bar_on_one(monkeypatch):
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert RoundProgress(3, stream=io.StringIO()).mode == "plain"
    assert RoundProgress(3, stream=Tty()).mode == "bar"
    monkeypatch.setenv("TERM", "dumb")  # e.g. an editor's shell buffer: no live redraws
    assert RoundProgress(3, stream=Tty()).mode == "plain"
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("FORCE_COLOR", "1")  # asks for colours, not a redrawn bar in a file
    assert RoundProgress(3, stream=io.StringIO()).mode == "plain"
    # Forced modes win over detection; enabled=False wins over everything.
    assert RoundProgress(3, stream=io.StringIO(), mode="bar").mode == "bar"
    assert RoundProgress(3, stream=Tty(), mode="plain").mode == "plain"
    assert RoundProgress(3, stream=Tty(), enabled=False, mode="bar").mode == "off"


def test_unknown_mode_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="'fancy'.*auto, bar, plain, off"):
        RoundProgress(3, mode="fancy")  # type: ignore[arg-type]


def test_plain_mode_prints_one_line_per_update_with_rate_and_eta():
    progress, stream, clock = plain(total=10)
    with progress:
        clock.advance(50.0)  # compilation before the first round: must not count
        progress.update(1, "loss 2.31414")
        clock.advance(2.0)
        progress.update(2, "loss 2.2")
        clock.advance(4.0)
        progress.update(3, "loss 2.1")
        clock.advance(7.0)
        progress.update(10)  # seven rounds in one interval, no status
    assert stream.getvalue().splitlines() == [
        "round 1/10  loss 2.31414  eta -:--:--",  # nothing timed yet
        "round 2/10  loss 2.2  2 s/round  eta 0:00:16",
        "round 3/10  loss 2.1  3 s/round  eta 0:00:21",  # (2 + 4) / 2 rounds, 7 left
        "round 10/10  1.44 s/round  eta 0:00:00",  # (2 + 4 + 7) s / 9 rounds
    ]


def test_eta_of_a_resumed_run_counts_only_rounds_since_the_first_update():
    # 40 of 60 rounds were restored; the process started long ago (clock at 1000) and the
    # first update comes after a slow compile. Only the 2 s rounds after it may count.
    progress, stream, clock = plain(total=60, completed=40)
    clock.advance(300.0)
    progress.update(41, "loss 1.0")
    assert progress.eta_s is None
    for completed in range(42, 46):
        clock.advance(2.0)
        progress.update(completed, "loss 1.0")
    assert progress.seconds_per_round == pytest.approx(2.0)
    assert progress.eta_s == pytest.approx(2.0 * 15)
    assert stream.getvalue().splitlines()[-1] == "round 45/60  loss 1.0  2 s/round  eta 0:00:30"


def test_rate_spans_several_rounds_per_update_and_only_the_recent_window():
    progress, _, clock = plain(total=100, window=2)
    progress.update(0)
    for completed, seconds in [(10, 100.0), (20, 10.0), (30, 30.0)]:
        clock.advance(seconds)  # log_every=10: each interval spans ten rounds
        progress.update(completed)
    # Only the last 2 intervals: (10 + 30) s over 20 rounds; the slow first one dropped out.
    assert progress.seconds_per_round == pytest.approx(2.0)
    assert progress.eta_s == pytest.approx(2.0 * 70)


def test_callers_round_time_gives_an_eta_from_the_first_update():
    progress, stream, clock = plain(total=20, completed=0)
    clock.advance(120.0)  # compile time: invisible to the caller's own round timing
    progress.update(1, "loss 3.0", round_time_s=1.25)
    assert stream.getvalue().splitlines() == ["round 1/20  loss 3.0  1.25 s/round  eta 0:00:24"]
    clock.advance(1.5)
    progress.update(2, "loss 2.9", round_time_s=1.0)
    # Two timed updates: the measured interval (all the loop's costs) wins.
    assert progress.seconds_per_round == pytest.approx(1.5)


def test_log_and_log_eval_are_never_hard_wrapped():
    long_line = "model: " + " ".join(f"word{i:03d}" for i in range(30)) + " [not markup]"
    assert len(long_line) > 200
    metrics = {f"eval/metric_with_a_long_name_{i:02d}": 0.5 for i in range(10)}
    for mode in ("plain", "bar"):
        stream = io.StringIO()
        with RoundProgress(3, stream=stream, mode=mode) as progress:
            progress.log(long_line)
            progress.log_eval(3, metrics)
            # Callers that print straight to the console (the summary) are not wrapped either.
            progress.console.print(long_line.replace("[", "(").replace("]", ")"))
        lines = stream.getvalue().splitlines()
        assert long_line in lines, mode  # whole, on one line, brackets printed literally
        assert long_line.replace("[", "(").replace("]", ")") in lines, mode
        evals = [line for line in lines if line.startswith("eval round 3: ")]
        assert len(evals) == 1 and len(evals[0]) > 200, mode
        assert all(key in evals[0] for key in metrics), mode


def test_log_eval_formats_sorted_scalars_with_four_significant_digits():
    progress, stream, _ = plain()
    progress.log_eval(
        20,
        {
            "round": 20,  # already in the prefix
            "eval/loss": 1.23456789,
            "eval/exact_match": np.float32(0.41),
            "eval/perplexity": math.inf,
            "eval/count": 7,
            "client/loss_worst10": np.array(12345.678),  # a 0-d array is a scalar
            "eval/per_task": {"copy": 1.0},  # not a scalar: skipped
            "eval/samples": ["a", "b"],
            "eval/vector": np.ones(3),
            "eval/example": "some generated text",
        },
    )
    assert stream.getvalue() == (
        "eval round 20: client/loss_worst10 1.235e+04  eval/count 7  eval/exact_match 0.41  "
        "eval/loss 1.235  eval/perplexity inf\n"
    )


def test_off_mode_and_disabled_progress_print_nothing():
    for kwargs in ({"mode": "off"}, {"enabled": False}, {"enabled": False, "mode": "plain"}):
        progress, stream, clock = plain(**kwargs)
        with progress:
            progress.update(1, "loss 1.0", round_time_s=1.0)
            progress.log("hidden")
            progress.log_eval(1, {"eval/loss": 1.0})
            progress.console.print("also hidden")
        assert stream.getvalue() == "", kwargs
        assert progress.eta_s == pytest.approx(59.0)  # still estimated, for callers
