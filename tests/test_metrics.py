"""Tests of fedjax_llm/metrics.py: the JSONL metrics writer, reading it back, the progress bar and
the summary table."""

from __future__ import annotations

import json
import math

from rich.console import Console

from fedjax_llm.metrics import MetricsWriter, RoundProgress, read_jsonl, summary_table

RECORDS = [
    {"round": 1, "train/loss": 2.5, "eval/perplexity": 12.25},
    {"round": 2, "train/loss": 1.75, "tags": ["a", "b"], "nested": {"x": 1}},
]


def test_writer_flushes_every_record_before_close(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"  # the directory does not exist yet
    writer = MetricsWriter(str(path))
    try:
        for i, record in enumerate(RECORDS):
            writer.write(record)
            # Readable from another handle at once: nothing waits for close().
            assert read_jsonl(str(path)) == RECORDS[: i + 1]
    finally:
        writer.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == RECORDS


def test_writer_without_history_appends_to_an_existing_file(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    first = MetricsWriter(path)
    first.write(RECORDS[0])
    first.close()
    second = MetricsWriter(path)
    second.write(RECORDS[1])
    second.close()
    assert read_jsonl(path) == RECORDS


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
    assert read_jsonl(path) == [{"round": 1}, {"round": 2}, {"round": 3}]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()

    # An empty history (resume at round 0) empties the file.
    MetricsWriter(path, history=[]).close()
    assert read_jsonl(path) == []


def test_read_jsonl_round_trip_skips_blank_lines_and_keeps_non_finite_floats(tmp_path):
    records = [*RECORDS, {"round": 3, "train/loss": math.inf, "grad_norm": -math.inf}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n  \n")
    writer = MetricsWriter(str(path))
    writer.write(records[2])
    writer.write({"loss": math.nan})
    writer.close()
    back = read_jsonl(str(path))
    assert back[:3] == records
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
