"""eval.py end to end on the default model at a small length, its report's arithmetic by hand, the run's record, and
inputs checked before the evaluation starts."""
import json
import re
import subprocess
import sys

import pytest
import torch

import cli
import eval as harness
import generate as gen
from conftest import ROOT
from errors import UserError
from evaluation.tasks import registry
from loading import tokenizer


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, smollm2_gguf):
    out = tmp_path_factory.mktemp("eval")
    harness.main(["--lengths", "1k", "--samples", "1", "--depths", "1", "--batch", "6", "--out", str(out)])
    return out, json.loads((out / "results.json").read_text())


def test_the_run_is_recorded(full_run):
    """results.json and results.md say where, when, with what and from which code every number came."""
    out, data = full_run
    header = data["header"]
    assert header["device"].startswith("CPU: ") or torch.cuda.is_available()
    assert header["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", header["date"])
    assert header["command"] == f"python eval.py --lengths 1k --samples 1 --depths 1 --batch 6 --out {out}"
    assert re.match(r"git [0-9a-f]{40}|longgen ", header["code"])
    assert header["wall_s"] > 0
    table = (out / "results.md").read_text()
    assert f"- Command: `{header['command']}`" in table and "- Device: " in table


def test_every_task_runs_and_reports(full_run):
    out, data = full_run
    assert {r["task"] for r in data["results"]} == set(registry())
    for r in data["results"]:
        assert 0 <= r["score"] <= 1 and isinstance(r["prediction"], str) and r["prompt_tokens"] <= 1024
    table = (out / "results.md").read_text()
    for name in [*registry(), "ruler (mean)", "babilong (mean)", "RULER effective length"]:
        assert name in table
    assert "instead of the GPT judge" in table  # substitutions are named
    for task in ("passkey", "niah"):
        assert (out / f"{task}_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_default_model_finds_the_passkey(full_run):
    """A sanity floor: SmolLM2 retrieves a passkey from 1K tokens of filler."""
    _, data = full_run
    assert [r["score"] for r in data["results"] if r["task"] == "passkey"] == [1.0]


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_kv_policies_run_at_their_budget(tmp_path, policy, smollm2_gguf):
    harness.main(["--tasks", "passkey", "--lengths", "512", "--samples", "1", "--depths", "1", "--layout", "full",
                  "--kv-policy", policy, "--kv-budget", "256", "--out", str(tmp_path)])  # twice the budget
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["header"]["kv_policy"] == policy and data["header"]["kv_budget"] == 256
    assert f"KV policy: {policy} at 256 tokens" in (tmp_path / "results.md").read_text()


def test_snapkv_compressed_before_the_question(tmp_path, smollm2_gguf):
    harness.main(["--tasks", "passkey", "--lengths", "512", "--samples", "1", "--depths", "1", "--layout", "full",
                  "--kv-policy", "snapkv", "--kv-budget", "256", "--compress-before-question", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["header"]["compress_before_question"] is True and len(data["results"]) == 1
    assert "cut after the context, before the question is read" in (tmp_path / "results.md").read_text()


def test_the_question_starts_where_the_context_tokens_stop(smollm2_gguf):
    """question_from: the tokens before it are the context's own; the question's text begins within the first token
    after it (a token may straddle the join)."""
    tok = tokenizer.load(smollm2_gguf)
    for name in ("passkey", "niah", "ruler/vt", "babilong/qa1"):
        s = registry()[name].sample(1024, 0, 0, tok)
        prompt = gen.encode_prompt(tok, s.prompt)
        n = harness.question_from(tok, prompt, s)
        assert prompt[:n] == gen.encode_prompt(tok, s.prompt[:s.meta["question_at"]])[:n]
        question = s.prompt[s.meta["question_at"]:]
        assert tok.decode(prompt[n:]).endswith(question) and len(tok.decode(prompt[n:])) - len(question) < 20


def test_report_means_and_effective_length():
    results = [dict(task=t, length=n, score=s) for t, n, s in [
        ("ruler/vt", 1024, 1.0), ("ruler/vt", 2048, 0.5), ("ruler/cwe", 1024, 0.9), ("ruler/cwe", 2048, 0.9),
        ("passkey", 1024, 1.0), ("passkey", 1024, 0.0), ("passkey", 2048, 1.0)]]
    header = dict(checkpoint="x", layout="2 full", kv_policy="none", kv_budget=0, samples=1, seed=0)
    text = harness.report(results, [1024, 2048], header, {}, {})
    assert "| passkey | 50.0 | 100.0 | 75.0 |" in text
    assert "| ruler (mean) | 95.0 | 70.0 | 82.5 |" in text
    assert "effective length (mean above 85.6): 1024" in text


def test_bad_input_is_one_sentence(tmp_path, smollm2_gguf):
    with pytest.raises(UserError, match="not a number of tokens"):
        harness.parse_length("4q")
    with pytest.raises(UserError, match="--layout full"):
        harness.main(["--tasks", "passkey", "--lengths", "1k", "--layout", "longgen", "--kv-policy", "h2o",
                      "--out", str(tmp_path)])
    with pytest.raises(UserError):
        harness.main(["--tasks", "passkey,nope", "--out", str(tmp_path)])


# ------------------------------------------------------------------------------------------------ checked first
@pytest.fixture
def no_evaluation(monkeypatch):
    """Loading the model or running a task fails the test: the mistake must be caught before either."""
    def started(*args, **kwargs):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(cli, "load_model", started)
    monkeypatch.setattr(harness, "run_task", started)


@pytest.mark.parametrize("args, message", [
    (["--ppl-data", "/definitely/not/here"], "--ppl-data /definitely/not/here does not exist"),
    (["--tasks", ","], "names no task"),
    (["--tasks", "passkey,nope"], "Unknown task 'nope'"),
    (["--lengths", ","], "names no length"),
    (["--lengths", "-5"], "0 or more"),
    (["--kv-policy", "h2o", "--layout", "full", "--kv-budget", "0"], "--kv-budget must be at least 1"),
    (["--kv-policy", "snapkv", "--layout", "full", "--kv-budget", "-5"], "--kv-budget must be at least 1"),
    (["--kv-policy", "streaming", "--layout", "full", "--kv-budget", "4"], "more than StreamingLLM's 4 sink"),
    (["--kv-budget", "256"], "--kv-budget applies only with --kv-policy"),
    (["--kv-policy", "h2o", "--layout", "full", "--batch", "2"], "--batch has no effect"),
    (["--kv-policy", "h2o", "--layout", "longgen"], "--layout full"),
    (["--compress-before-question"], "--compress-before-question applies to --kv-policy h2o or snapkv"),
    (["--kv-policy", "streaming", "--layout", "full", "--compress-before-question"], "streaming does not"),
    (["--sparse", "strided"], "--sparse applies only with --layout longgen"),
    (["--layout", "longgen", "--window", "-1"], "--window must be at least 1"),
    (["--seed", str(2**70)], "--seed"),
    (["--device", "tpu"], "--device tpu"),
])
def test_mistakes_are_caught_before_the_evaluation(tmp_path, no_evaluation, args, message):
    with pytest.raises(UserError, match=re.escape(message)):
        harness.main(["--tasks", "passkey", "--lengths", "1k", "--out", str(tmp_path / "out"), *args])


def test_out_is_never_overwritten_unless_asked(tmp_path, no_evaluation):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="is a file"):
        harness.main(["--tasks", "passkey", "--out", str(tmp_path / "file")])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a report .results.json.; .*--overwrite"):
        harness.main(["--tasks", "passkey", "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "results.json").read_text() == "{}"
    with pytest.raises(AssertionError, match="the evaluation started"):  # --overwrite lets the run start
        harness.main(["--tasks", "passkey", "--out", str(tmp_path / "run"), "--overwrite"])


def test_absurd_lengths_fail_before_any_prompt_is_built(tmp_path, smollm2_gguf, monkeypatch):
    monkeypatch.setattr(harness, "run_task", lambda *a, **k: pytest.fail("a task started"))
    with pytest.raises(UserError, match="--lengths 1000000000 exceeds the model's context of 8192 tokens"):
        harness.main(["--tasks", "passkey", "--lengths", "1k,1000000000", "--out", str(tmp_path)])


def test_progress_counts_samples_and_overwrite_replaces(tmp_path, smollm2_gguf, capsys):
    args = ["--lengths", "256", "--samples", "1", "--out", str(tmp_path)]
    harness.main([*args, "--tasks", "passkey", "--depths", "2"])
    assert "2/2" in capsys.readouterr().err  # one step per sample (it was one per task and length: 0/1, then 1/1)
    assert (tmp_path / "passkey_heatmap.png").exists()
    harness.main([*args, "--tasks", "babilong/qa1", "--overwrite"])  # another task (20 new tokens, not 128)
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["task"] for r in data["results"]} == {"babilong/qa1"}
    assert not (tmp_path / "passkey_heatmap.png").exists()  # the earlier run's picture went with it


def test_help_names_only_files_in_the_repository():
    for script in ("eval.py", "generate.py"):
        text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60).stdout
        assert "shared" not in text
        for name in re.findall(r"\b[A-Z][A-Z_]+\.md\b", text):  # the repository's documents
            assert (ROOT / name).is_file(), name
        options = re.findall(r"^  (--[\w-]+)", text, re.M)
        helped = re.findall(r"^  (--[\w-]+)(?: \S+)?\s{2,}\S", text, re.M) + re.findall(
            r"^  (--[\w-]+).*\n {20,}\S", text, re.M)
        assert set(options) <= set(helped) | {"--help"}, set(options) - set(helped)


# ------------------------------------------------------------------------------------------------ --merge
def fake_run(out, tasks, lengths, samples=2, **header):
    """A report as eval.py writes it, without a model: every task at every length, scores from the cell."""
    results = [dict(task=t, length=n, score=(i + j) % 2, depth=0.5)
               for i, t in enumerate(tasks) for j, n in enumerate(lengths) for _ in range(samples)]
    head = dict(checkpoint="runs/a/final", layout="2 full", kv_policy="none", kv_budget=2112,
                compress_before_question=False, samples=samples, seed=0, lengths=lengths, device="cpu",
                torch="2", date=f"2026-12-01T0{len(tasks)}:00:00", command=f"python eval.py --tasks {','.join(tasks)}",
                code="git abc", wall_s=10.0)
    head.update(header)
    out.mkdir(parents=True)
    harness.write_report(out, dict(header=head, substitutions={t: [f"sub {t}"] for t in tasks}, perplexity={},
                                   results=results))
    return out


def test_merge_joins_reports_of_one_model(tmp_path, no_evaluation):
    a = fake_run(tmp_path / "retrieval", ["passkey", "niah"], [1024, 2048], samples=2)
    b = fake_run(tmp_path / "rest", ["ruler/vt"], [1024, 2048], samples=3)
    harness.main(["--merge", str(a), str(b), "--out", str(tmp_path / "both")])
    run = json.loads((tmp_path / "both" / "results.json").read_text())
    text = (tmp_path / "both" / "results.md").read_text()
    for part in (a, b):  # every row of each part's report, unchanged
        rows = [line for line in (part / "results.md").read_text().splitlines() if line.startswith("| ")][1:]
        assert rows and all(row in text for row in rows)
    assert len(run["results"]) == 2 * 2 * 2 + 1 * 2 * 3
    h = run["header"]
    assert h["samples"] == "2 (niah, passkey); 3 (ruler)" and h["lengths"] == [1024, 2048] and h["wall_s"] == 20.0
    assert [p["command"] for p in h["parts"]] == ["python eval.py --tasks passkey,niah", "python eval.py --tasks ruler/vt"]
    assert h["date"] == "2026-12-01T01:00:00" and h["command"].startswith("python eval.py --merge")
    assert "sub ruler/vt" in text and "sub passkey" in text and (tmp_path / "both" / "passkey_heatmap.png").exists()


def test_merge_joins_lengths_with_their_budgets(tmp_path, no_evaluation):
    parts = [fake_run(tmp_path / f"{n}", ["passkey"], [n], kv_policy="snapkv", kv_budget=b, layout="2 full")
             for n, b in [(2048, 700), (1024, 500)]]
    harness.main(["--merge", *map(str, parts), "--out", str(tmp_path / "both")])
    h = json.loads((tmp_path / "both" / "results.json").read_text())["header"]
    assert h["lengths"] == [1024, 2048] and h["kv_budget"] == "500 / 700 (at 1K / 2K)" and h["samples"] == 2
    third = fake_run(tmp_path / "3000", ["passkey"], [3000], kv_policy="snapkv", kv_budget=900)
    harness.main(["--merge", str(tmp_path / "both"), str(third), "--out", str(tmp_path / "all")])  # a merge again
    h = json.loads((tmp_path / "all" / "results.json").read_text())["header"]
    assert h["kv_budget"] == "500 / 700 / 900 (at 1K / 2K / 3000)" and len(h["parts"]) == 3
    assert "| passkey | 0.0 | 0.0 | 0.0 | 0.0 |" in (tmp_path / "all" / "results.md").read_text()


@pytest.mark.parametrize("second, message", [
    (dict(tasks=["passkey"], lengths=[1024]), "passkey at 1024 tokens is in both"),
    (dict(tasks=["niah"], lengths=[2048]), "no run has passkey at 2048 tokens"),
    (dict(tasks=["niah"], lengths=[1024], checkpoint="runs/b/final"), "their checkpoint differs"),
    (dict(tasks=["niah"], lengths=[1024], kv_policy="h2o"), "their kv_policy differs"),
])
def test_merge_refuses_reports_that_do_not_fit(tmp_path, no_evaluation, second, message):
    a = fake_run(tmp_path / "a", ["passkey"], [1024])
    b = fake_run(tmp_path / "b", **second)
    with pytest.raises(UserError, match=re.escape(message)):
        harness.main(["--merge", str(a), str(b), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "results.json").exists()


def test_merge_refuses_what_eval_did_not_write(tmp_path, no_evaluation):
    a = fake_run(tmp_path / "a", ["passkey"], [1024])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no results.json"):
        harness.main(["--merge", str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    (tmp_path / "empty" / "results.json").write_text('{"header": {}')
    with pytest.raises(UserError, match="is not a report eval.py wrote"):
        harness.main(["--merge", str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match="already holds a report"):  # --out is checked as for an evaluation
        harness.main(["--merge", str(a), "--out", str(a)])
