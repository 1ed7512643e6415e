"""bench.py end to end on a tiny model on the CPU: every part runs, the JSON holds every row, and the table's ratios
are computed from the measured numbers (the numbers themselves mean nothing on a CPU)."""
import json
import re

import pytest

import bench
from errors import UserError, write_atomic


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = bench.parse_args(["--preset", "tiny", "--lengths", "256,512", "--batch", "1,2", "--new-tokens", "12",
                             "--train-lengths", "256", "--train-precision", "bf16,float8", "--hf-lengths", "256", "--decode-kernels", "fused,plain",
                             "--no-compile", "--device", "cpu",
                             "--json", str(out)])
    report = bench.run(args)
    return report, json.loads(out.read_text()), bench.tables(report)


def test_every_row_is_measured_and_written(run):
    report, written, _ = run
    assert written == json.loads(json.dumps(report))
    layouts = ["full", "longgen sink_window", "longgen strided"]
    assert [(r["length"], r["batch"], r["layout"], r["kernels"]) for r in written["inference"]] == \
        [(n, b, lay, k) for n in (256, 512) for b in (1, 2) for lay in layouts for k in ("fused", "plain")]
    assert [r["product"].split(",")[0] for r in written["products"]] == ["wqkv", "wo", "w13", "w2", "output"]
    for r in written["products"]:
        assert not r["fused_ran"]  # on a CPU every product takes the reference path
        assert r["fused_GBps"] == pytest.approx(r["N"] * r["K"] * 2 / r["fused_us"] / 1e3)
    assert [(r["length"], r["variant"]) for r in written["masks"]] == \
        [(n, v) for n in (256, 512) for v in ("sink_window", "strided")]
    assert [(r["precision"], r["layout"], r["layers"], r["full_layers"]) for r in written["train"]] == \
        [(p, *row) for p in ("bf16", "float8")
         for row in (("full", 8, 8), ("longgen sink_window", 8, 3), ("longgen strided", 8, 3))]
    assert [r["length"] for r in written["hf"]] == [256]
    for r in written["inference"]:
        assert r["prefill_s"] > 0 and r["decode_ms"] > 0 and r["kv_bytes"] > 0
        assert r["roofline_frac"] == pytest.approx(r["roofline_ms"] / r["decode_ms"])
        assert r["kv_bytes"] <= r["kv_full_bytes"]
    for r in written["train"]:
        assert r["step_ms"] > 0 and r["attn_pairs"] > 0
    sparse = [r for r in written["train"] if r["layout"] != "full"]
    assert all(r["attn_pairs"] < written["train"][0]["attn_pairs"] for r in sparse)


def test_table_ratios_come_from_the_measurements(run):
    report, _, table = run
    rows = [line.split("|")[1:-1] for line in table.splitlines() if re.match(r"\| \d+ \| \d+ \| ", line)]
    assert len(rows) == len(report["inference"])
    for cells, r in zip(rows, report["inference"]):
        ref = next(x for x in report["inference"] if x["layout"] == "full" and x["length"] == r["length"]
                   and x["batch"] == r["batch"] and x["kernels"] == r["kernels"])
        assert cells[3].strip() == r["kernels"]
        kv, prefill, decode = cells[5].strip(), cells[7].strip(), cells[9].strip()
        if r is ref:
            assert (kv, prefill, decode) == ("", "", "")
        else:
            assert kv == f"{r['kv_bytes'] / ref['kv_bytes'] - 1:+.0%}"
            assert prefill == f"{ref['prefill_s'] / r['prefill_s']:.2f}x"
            assert decode == f"{ref['decode_ms'] / r['decode_ms']:.2f}x"
    train_rows = [line.split("|")[1:-1] for line in table.splitlines() if "| 8 (" in line]
    assert len(train_rows) == len(report["train"])
    for cells, r in zip(train_rows, report["train"]):
        full = next(x for x in report["train"] if x["layout"] == "full" and x["precision"] == r["precision"])
        bf16 = next(x for x in report["train"] if x["layout"] == r["layout"] and x["precision"] == "bf16")
        assert cells[5].strip() == ("" if r is full else f"{full['step_ms'] / r['step_ms']:.2f}x")
        assert cells[6].strip() == ("" if r is bf16 else f"{bf16['step_ms'] / r['step_ms']:.2f}x")


def test_rows_that_do_not_fit_are_skipped_and_said(monkeypatch, capsys):
    monkeypatch.setattr(bench, "free_bytes", lambda device: 0)
    report = bench.run(bench.parse_args(["--preset", "tiny", "--lengths", "128", "--batch", "1", "--variant",
                                         "sink_window", "--parts", "inference", "--new-tokens", "12", "--no-compile",
                                         "--device", "cpu"]))
    assert all("does not fit" in r["skipped"] for r in report["inference"])
    assert "skipped: its" in bench.tables(report)


@pytest.mark.parametrize("argv, message", [(["--parts", "decode"], "Unknown parts"),
                                           (["--lengths", "lots"], "Cannot read the length"),
                                           (["--new-tokens", "8"], "at least 12"),
                                           (["--decode-kernels", "cublas"], "fused, plain"),
                                           (["--train-precision", "fp8"], "bf16, float8")])
def test_bad_arguments_say_what_to_fix(argv, message):
    with pytest.raises(UserError, match=message):
        bench.parse_args(argv)


def test_a_report_is_written_whole_or_not_at_all(tmp_path):
    """bench.py rewrites its JSON after each measurement: a run stopped while writing keeps the previous report (a
    string or a writer function alike)."""
    class Interrupted(str):
        def encode(self, *args):
            raise KeyboardInterrupt

    path = tmp_path / "bench.json"
    write_atomic(path, '{"rows": 1}')
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, Interrupted('{"rows": 2}'))

    def half_then_interrupted(f):  # a writer function (np.savez, savefig) stopped halfway
        f.write(b'{"rows": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, half_then_interrupted)
    assert json.loads(path.read_text()) == {"rows": 1} and [p.name for p in tmp_path.iterdir()] == ["bench.json"]
