"""plot_runs.py draws train.py's metrics files and refuses what is not one."""
import json

import pytest

import plot_runs
from errors import UserError


def write_run(path, losses):
    records = [{"event": "setup"}] + [dict(step=i + 1, loss=v, tokens_per_s=100.0 + i) for i, v in enumerate(losses)]
    records.append(dict(step=len(losses), eval_loss=losses[-1]))
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_two_runs_make_one_png(tmp_path):
    (tmp_path / "a").mkdir()
    write_run(tmp_path / "a" / "metrics.jsonl", [3.0, 2.5, 2.0])
    write_run(tmp_path / "b.jsonl", [3.1, 2.4, 2.2])
    out = tmp_path / "curves.png"
    plot_runs.main([str(tmp_path / "a"), str(tmp_path / "b.jsonl"), "-o", str(out), "--smooth", "2"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_runs.read_metrics(str(tmp_path / "a"))[0] == "a"
    assert plot_runs.trailing_mean([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_a_resumed_run_keeps_the_later_record_of_a_repeated_step():
    records = [dict(step=1, loss=3.0), dict(step=2, loss=2.9), dict(step=2, loss=2.5), dict(step=3, loss=2.0),
               dict(step=3, eval_loss=2.2)]
    assert [r["loss"] for r in plot_runs.by_step(records, "loss")] == [3.0, 2.5, 2.0]
    assert plot_runs.by_step(records, "eval_loss") == [dict(step=3, eval_loss=2.2)]


def test_missing_or_foreign_files_are_named(tmp_path):
    with pytest.raises(UserError, match="No metrics at"):
        plot_runs.read_metrics(str(tmp_path / "nothing"))
    (tmp_path / "x.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match="line 1 is not JSON"):
        plot_runs.read_metrics(str(tmp_path / "x.jsonl"))


def test_a_restart_marks_where_the_history_continues():
    """A run killed after step 4 and resumed from step_2 (say, its newest whole checkpoint): steps 3 and 4 of the
    first attempt are not the run's history, even where the second attempt has not reached them yet."""
    records = [dict(event="setup", resumed_at=0), dict(step=1, loss=3.0), dict(step=2, loss=2.8),
               dict(step=3, loss=2.6), dict(step=4, loss=2.4), dict(step=4, eval_loss=2.5),
               dict(event="setup", resumed_at=2), dict(step=3, loss=2.7)]
    assert [(r["step"], r["loss"]) for r in plot_runs.by_step(records, "loss")] == [(1, 3.0), (2, 2.8), (3, 2.7)]
    assert plot_runs.by_step(records, "eval_loss") == []
