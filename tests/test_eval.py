"""eval.py end to end on the default model at a small length, and its report's arithmetic by hand."""
import json

import pytest

import eval as harness
from errors import UserError
from eval_tasks import registry


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, smollm2_gguf):
    out = tmp_path_factory.mktemp("eval")
    harness.main(["--lengths", "1k", "--samples", "1", "--depths", "1", "--batch", "6", "--out", str(out)])
    return out, json.loads((out / "results.json").read_text())


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
    harness.main(["--tasks", "passkey", "--lengths", "1k", "--samples", "1", "--depths", "1", "--layout", "full",
                  "--kv-policy", policy, "--kv-budget", "256", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["header"]["kv_policy"] == policy and data["header"]["kv_budget"] == 256
    assert f"KV policy: {policy} at 256 tokens" in (tmp_path / "results.md").read_text()


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
