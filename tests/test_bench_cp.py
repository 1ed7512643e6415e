"""benchmarks/bench_cp.py end to end on two CPU processes (gloo) at tiny sizes: every part and row runs, the JSON holds
them, the exchange is counted, and the table's ratios come from the measured numbers (which mean nothing on a CPU)."""
import json
import subprocess
import sys

import pytest

from benchmarks import bench_cp
from conftest import ROOT
from errors import UserError


def bench(out, *args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "benchmarks.bench_cp", "--preset", "tiny", "--dp-preset", "tiny", "--layers", "4", "--no-compile", "--json",
           str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return bench(tmp_path_factory.mktemp("bench_cp") / "cp.json", "--lengths", "256", "--single-lengths", "256",
                 "--dp-length", "128", "--docs", "60", "--steps", "1", "--dp-reshard", "true,false")


def test_every_row_is_measured_and_written(run):
    report, _ = run
    assert report["gpus"] == 2 and report["device"] == "cpu"
    assert [(r["part"], r["layout"], r["exchange"], r["dp"], r["cp"]) for r in report["rows"]] == [
        ("cp", "full", "allgather", 1, 2),
        ("cp", "sink_window", "pattern", 1, 2), ("cp", "sink_window", "allgather", 1, 2),
        ("cp", "strided", "pattern", 1, 2), ("cp", "strided", "allgather", 1, 2),
        ("single", "full", None, 1, 1), ("single", "sink_window", None, 1, 1), ("single", "strided", None, 1, 1),
        ("dp", "sink_window", None, 1, 1), ("dp", "sink_window", None, 2, 1),
        ("dp", "sink_window", None, 1, 1), ("dp", "sink_window", None, 2, 1)]
    assert [r.get("reshard_after_forward") for r in report["rows"][-4:]] == [True, True, False, False]
    for r in report["rows"]:
        one_gpu_dp = r["part"] == "dp" and r["dp"] == 1  # every rank's window in turn: two timed steps
        assert len(r["steps_s"]) == (3 if one_gpu_dp else 2) and r["steps_s"][1] > 0
        assert r["step_s"] == (r["steps_s"][1] + r["steps_s"][2]) / 2 if one_gpu_dp else r["steps_s"][1]
        assert len(r["steps_s_per_rank"]) == r["dp"] * r["cp"]
        assert r["steps_s"] == [max(ts) for ts in zip(*r["steps_s_per_rank"])]
        step_s = r["mean_step_s"] if r["part"] == "dp" else r["step_s"]
        assert r["tokens_per_s"] == pytest.approx(r["dp"] * r["length"] / step_s)
        assert r["flops_per_step"] > 0 and r["documents"] > 1  # 60-token documents cross the chunks of 64
        assert sorted(r["exchanged"]) == ([] if r["cp"] == 1 else sorted({"full", r["layout"]}))
        for kind, x in r["exchanged"].items():
            gathered = 2 * 1 * 128  # two ranks receive the other's 128 rows
            assert x["allgather_rows_per_layer"] == gathered
            if kind == "full" or r["exchange"] == "allgather":
                assert x["rows_per_layer"] == gathered and x["of_allgather"] == 1
            else:
                assert x["needed_rows_per_layer"] <= x["rows_per_layer"] < gathered


def test_table_ratios_come_from_the_measurements(run):
    report, stdout = run
    lines = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| cp ")
             or line.startswith("| single ") or line.startswith("| dp ")]
    assert len(lines) == len(report["rows"])
    rows = report["rows"]
    for cells, r in zip(lines, rows):
        cells = [c.strip() for c in cells]
        full = next(x for x in rows if x["part"] == r["part"] and x["layout"] == "full" and x["dp"] == r["dp"]) \
            if r["part"] != "dp" else None
        assert cells[8] == ("" if full in (None, r) else f"{full['step_s'] / r['step_s']:.2f}x")
        if r["exchange"] == "pattern":
            gathered = next(x for x in rows if x["layout"] == r["layout"] and x["exchange"] == "allgather")
            assert cells[9] == f"{gathered['step_s'] / r['step_s']:.2f}x"
        if r["dp"] * r["cp"] > 1:
            one = next(x for x in rows if x["part"] == ("dp" if r["part"] == "dp" else "single")
                       and x["layout"] == r["layout"] and x["dp"] * x["cp"] == 1
                       and x.get("reshard_after_forward") == r.get("reshard_after_forward"))
            assert cells[10] == f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x"
        if r["exchange"] == "pattern":
            sparse = r["exchanged"][r["layout"]]
            assert cells[12:14] == [str(sparse["rows_per_layer"]), f"{sparse['of_allgather']:.1%}"]


def test_table_of_several_reports(run, tmp_path, capsys):
    """Two reports (two device calls' JSON) make one table, with the ratios across them: the same as one report's."""
    report, stdout = run
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(dict(report, rows=report["rows"][:5])))  # the cp rows
    second.write_text(json.dumps(dict(report, rows=report["rows"][5:])))  # one GPU and dp: cp's "vs 1 GPU" is here
    bench_cp.main(["--table", str(first), str(second)])
    assert capsys.readouterr().out.strip() == bench_cp.table(report)
    with pytest.raises(UserError, match="Cannot read the report"):
        bench_cp.main(["--table", str(tmp_path / "missing.json")])


def test_rows_past_the_budget_are_skipped_and_said(tmp_path):
    report, stdout = bench(tmp_path / "late.json", "--parts", "single", "--single-lengths", "128", "--docs", "none",
                           "--budget-s", "1e-9", nproc=1)
    assert [r["skipped"] for r in report["rows"]] == ["past --budget-s 1e-09"] * 3
    assert stdout.count("skipped: past --budget-s") == 3


@pytest.mark.parametrize("argv, message", [(["--parts", "pp"], "Unknown parts"),
                                           (["--layouts", "dense"], "--layouts and --dp-layout take"),
                                           (["--exchange", "ring"], "--exchange takes"),
                                           (["--docs", "many"], "--docs takes"),
                                           (["--steps", "0"], "at least 1"),
                                           (["--dp-reshard", "yes"], "--dp-reshard takes"),
                                           (["--lengths", "lots"], "Cannot read the length")])
def test_bad_arguments_say_what_to_fix(argv, message):
    with pytest.raises(UserError, match=message):
        bench_cp.parse_args(argv)
