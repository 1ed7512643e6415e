"""train.py on CPUs: two processes (gloo) of the tiny config on a small corpus."""
import json
import subprocess
import sys

import pytest

import longgen
import train as train_py
from config import load_config
from conftest import ROOT

WORDS = "the long context of a story unfolds over many chapters and every chapter remembers the first one".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources of plain-text documents, some long enough to be upsampled."""
    root = tmp_path_factory.mktemp("corpus")
    for source, n_docs in (("novels", 12), ("manuals", 20)):
        (root / source).mkdir()
        for i in range(n_docs):
            n_words = 40 + (i * 37) % 300
            text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n_words))
            (root / source / f"doc{i:02d}.txt").write_text(f"Document {i} of {source}. {text}\n")
    return root


def train(out, corpus, *args, nproc=2, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           "--config", "configs/tiny.yaml", f"out_dir={out}",
           f"data.paths=[{corpus / 'novels'},{corpus / 'manuals'}]", f"data.cache_dir={out.parent / 'tokens'}",
           *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("runs") / "whole"
    return out, train(out, corpus)


def test_two_processes_shard_the_model_and_learn(uninterrupted):
    out, records = uninterrupted
    setup = records[0]
    assert setup["event"] == "setup" and setup["world_size"] == 2
    assert setup["local_params"] < 0.6 * setup["params"]  # FSDP2: each rank holds about half
    curve = losses(records)
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    assert curve[6] < curve[1] - 0.5  # it learns
    assert setup["layout"].count("full") == 2 and setup["layout"].count("sink_window") == 4


def test_exported_model_generates(uninterrupted):
    out, _ = uninterrupted
    model, tok = longgen.load(out / "final")
    assert model.cfg.attn.count("sink_window") == 4  # the checkpoint records its LongGen layout
    done = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(out / "final"), "--prompt",
                           "The long context", "--max-new-tokens", "5"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("The long context") and "4 sink_window" in done.stderr


def test_resume_continues_bit_for_bit(tmp_path, corpus, uninterrupted):
    _, whole = uninterrupted
    out = tmp_path / "halves"
    first = train(out, corpus, "steps=3")
    (out / "step_5.tmp").mkdir()  # a save that was cut off ...
    (out / "step_5.tmp" / "junk").write_text("half a checkpoint")
    (out / "step_4").mkdir()  # ... and a directory without its metadata: neither is a checkpoint
    second = train(out, corpus, "steps=6", "--resume")
    resumed = [r for r in second if r.get("event") == "setup"][-1]
    assert resumed["resumed_at"] == 3
    assert {**losses(first), **losses(second)} == losses(whole)  # identical floats, not just close


def test_full_attention_baseline_in_one_process(tmp_path, corpus):
    records = train(tmp_path / "full", corpus, "steps=2", "--baseline", "full", nproc=1)
    assert set(records[0]["layout"]) == {"full"} and records[0]["world_size"] == 1


@pytest.mark.parametrize("doc_masking", ["true", "false"])
def test_context_parallel_run_equals_one_process(tmp_path, corpus, doc_masking):
    """Two ranks splitting every sequence (cp_degree=2) train exactly as one process does on the same data: the
    sink_window layers exchange only their halo without documents, and all-gather with them."""
    args = ["steps=3", f"doc_masking={doc_masking}"]
    single = train(tmp_path / "single", corpus, *args, nproc=1)
    split = train(tmp_path / "cp", corpus, *args, "cp_degree=2", nproc=2)
    assert split[0]["world_size"] == 2 and split[0]["local_params"] < 0.6 * split[0]["params"]
    assert losses(split) == pytest.approx(losses(single), rel=1e-4)


def test_pattern_keys_reach_the_converted_model():
    cfg = load_config(train_py.TrainConfig, ROOT / "configs/tiny.yaml", ["pattern.window=40", "pattern.n_sink=0"])
    model_cfg, _ = train_py.model_config(cfg, type("Tok", (), {"n_vocab": 512}))
    assert (model_cfg.window, model_cfg.n_sink) == (40, 0) and "sink_window" in model_cfg.attn
    default, _ = train_py.model_config(load_config(train_py.TrainConfig, ROOT / "configs/tiny.yaml"),
                                       type("Tok", (), {"n_vocab": 512}))
    assert default.window != 40


@pytest.mark.parametrize("override, message", [
    ("cp_degree=3", "seq_len must be a multiple of 2 * cp_degree"),
    ("cp_degree=2", "cp_degree=2 must divide the number of processes (1)"),
    ("lrr=1", "Unknown config key lrr"),
    ("lr=fast", "lr must be float"),
    ("data.pathz=[x]", "Unknown config key data.pathz"),
    ("baseline=half", "baseline must be longgen or full"),
    ("pattern.window=0", "pattern values must be positive integers"),
    ("pattern.windw=8", "Unknown config key pattern.windw"),
])
def test_bad_config_is_one_sentence(override, message):
    done = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", override], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr


def test_existing_run_is_not_overwritten(tmp_path, corpus, uninterrupted):
    out, _ = uninterrupted
    done = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", f"out_dir={out}",
                           f"data.paths=[{corpus / 'novels'}]"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--resume" in done.stderr


def test_float8_training_converts_the_blocks_and_learns(tmp_path, corpus, uninterrupted):
    """float8=true (torchao; emulated on a CPU) under FSDP2 on two processes: every linear layer of the blocks runs in
    float8, the output layer does not, and the model still learns."""
    _, whole = uninterrupted
    records = train(tmp_path / "f8", corpus, "float8=true")
    setup = records[0]
    assert setup["float8_layers"] == 4 * len(setup["layout"])  # wqkv, wo, w13, w2 of every block
    curve = losses(records)
    assert curve[6] < curve[1] - 0.5
    first = losses(whole)[1]  # the same weights and data: close to the 32-bit loss, not equal (float8 products)
    assert curve[1] == pytest.approx(first, rel=0.01) and curve[1] != first


def test_save_to_disk_corpus_trains_and_exports_to_transformers(tmp_path, corpus):
    """A Dataset.save_to_disk directory is a source of the 2-process run; --export-hf writes a model transformers
    loads with our logits (every layer full, --baseline full)."""
    datasets = pytest.importorskip("datasets")
    import torch
    from transformers import AutoModelForCausalLM

    texts = [p.read_text() for p in sorted((corpus / "novels").glob("*.txt"))]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "novels_hf"))
    records = train(tmp_path / "run", corpus, f"data.paths=[{tmp_path / 'novels_hf'},{corpus / 'manuals'}]",
                    "steps=2", "--baseline", "full", "--export-hf", str(tmp_path / "hf"))
    assert set(records[0]["data"]["sources"]) == {"novels_hf", "manuals"} and records[0]["world_size"] == 2
    ours, _ = longgen.load(tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.cfg.vocab_size, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), atol=2e-5, rtol=1e-4)
