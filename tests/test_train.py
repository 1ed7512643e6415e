"""train.py on CPUs: two processes (gloo) of the tiny config on a small corpus."""
import fcntl
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest

from training import checkpoint
import longgen
import train as train_py
from training.config import load_config
from conftest import ROOT
from errors import UserError, run_cli

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
           *config_args(out, corpus), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def config_args(out, corpus):
    return ["--config", "configs/tiny.yaml", f"out_dir={out}", f"data.paths=[{corpus / 'novels'},{corpus / 'manuals'}]",
            f"data.cache_dir={out.parent / 'tokens'}"]


def one_process(out, corpus, *args, driver=None, timeout=300):
    """`python train.py ...` in one process (or the same through a driver script that wraps train.main first)."""
    program = ["-c", driver] if driver else ["train.py"]
    return subprocess.run([sys.executable, *program, *config_args(out, corpus), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


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


def test_keeping_gathered_weights_changes_no_loss(tmp_path, corpus, uninterrupted):
    """reshard_after_forward=false (each block keeps its all-gathered weights from forward to backward: fewer
    all-gathers) trains the same model: the first 3 steps' losses equal the default run's bit for bit."""
    records = train(tmp_path / "kept", corpus, "reshard_after_forward=false", "steps=3", "save_every=0")
    assert losses(records) == {step: loss for step, loss in losses(uninterrupted[1]).items() if step <= 3}


def test_calibrated_placement_calibrates_at_step_0_and_keeps_the_layout(tmp_path, corpus):
    out = tmp_path / "cal"
    records = train(out, corpus, "placement=calibrated", "calibration.samples=2", "steps=1", "save_every=0")
    cal = json.loads((out / "calibration.json").read_text())
    assert (out / "calibration.png").is_file() and len(cal["full_layers"]) == 2  # as many as the middle third
    layout = tuple("full" if i in cal["full_layers"] else "sink_window" for i in range(6))
    assert tuple(records[0]["layout"]) == layout
    model, _ = longgen.load(out / "final")
    assert model.cfg.layer_kinds == layout  # the trained checkpoint records it
    given = load_config(train_py.TrainConfig, ROOT / "configs/tiny.yaml", ["placement=calibrated",
                                                                          "full_layers=[0,5]"])
    assert train_py.model_config(given, train_py.base_model(given, type("Tok", (), {"n_vocab": 512}))[0]).layer_kinds == (
        "full", "sink_window", "sink_window", "sink_window", "sink_window", "full")


def test_exported_model_generates(uninterrupted, capsys):
    """generate.py's main on the exported model, in this process (tests/test_generate.py runs its command line)."""
    import generate

    out, _ = uninterrupted
    model, tok = longgen.load(out / "final")
    assert model.cfg.layer_kinds.count("sink_window") == 4  # the checkpoint records its LongGen layout
    generate.main(["--checkpoint", str(out / "final"), "--prompt", "The long context", "--max-new-tokens", "5"])
    done = capsys.readouterr()
    assert done.out.startswith("The long context") and "4 sink_window" in done.err


def test_resume_continues_bit_for_bit(tmp_path, corpus, uninterrupted):
    """The uninterrupted run's step-3 checkpoint (as a run stopped after step 3 leaves it) continues to step 6 with
    that run's losses."""
    whole_dir, whole = uninterrupted
    out = tmp_path / "halves"
    out.mkdir()
    shutil.copytree(whole_dir / "step_3", out / "step_3")
    (out / "step_5.tmp").mkdir()  # a save that was cut off ...
    (out / "step_5.tmp" / "junk").write_text("half a checkpoint")
    (out / "step_4").mkdir()  # ... and a directory without its metadata: neither is a checkpoint
    second = train(out, corpus, "steps=6", "--resume")
    resumed = [r for r in second if r.get("event") == "setup"][-1]
    assert resumed["resumed_at"] == 3
    curve = losses(second)
    assert sorted(curve) == [4, 5, 6]
    assert curve == {step: losses(whole)[step] for step in curve}  # identical floats, not just close


def test_checkpoint_of_two_processes_resumes_on_one_and_back(tmp_path, corpus, uninterrupted):
    """DCP reshards: the two-process run's step-3 checkpoint continues on one process (grad_accum doubled: the same
    windows per step) to step 5, and that one on two processes again to step 6, with the losses of the run that was
    never interrupted (float32; the sums group the windows differently, so not bit for bit)."""
    whole_dir, whole = uninterrupted
    out = tmp_path / "reshard"
    out.mkdir()
    shutil.copytree(whole_dir / "step_3", out / "step_3")
    train(out, corpus, "steps=5", "grad_accum=4", "--resume", nproc=1)
    records = train(out, corpus, "steps=6", "--resume")
    setups = [r for r in records if r.get("event") == "setup"]
    assert [(r["world_size"], r["resumed_at"]) for r in setups] == [(1, 3), (2, 5)]
    curve = losses(records)
    assert sorted(curve) == [4, 5, 6]
    assert curve == pytest.approx({step: losses(whole)[step] for step in curve}, rel=1e-4)


def test_full_attention_baseline_in_one_process(tmp_path, corpus):
    records = train(tmp_path / "full", corpus, "steps=2", "--baseline", "full", nproc=1)
    assert set(records[0]["layout"]) == {"full"} and records[0]["world_size"] == 1


def test_context_parallel_run_equals_one_process(tmp_path, corpus, small):
    """Two ranks splitting every sequence (cp_degree=2) train exactly as one process does on the same data: the
    `small` run, whose config this one repeats but for cp_degree (documents masked, tiny's default); the sink_window
    layers exchange only their halo. Without documents (doc_masking=false), context parallelism equals one process in
    tests/test_context_parallel.py::test_cp_equals_one_process[cp2-longgen] (logits, loss and gradients)."""
    split = train(tmp_path / "cp", corpus, "steps=2", "save_every=1", "cp_degree=2", nproc=2)
    assert split[0]["world_size"] == 2 and split[0]["local_params"] < 0.6 * split[0]["params"]
    assert sorted(losses(split)) == [1, 2] and losses(split) == pytest.approx(small[1], rel=1e-4)
    for record in split[1:]:  # what the two ranks exchanged: every row for full layers, fewer for sink + window
        full, sparse = record["exchange"]["full"], record["exchange"]["sink_window"]
        assert (full["layers"], sparse["layers"]) == (2, 4)
        assert full["rows_per_layer"] == full["allgather_rows_per_layer"] == 2 * 2 * 64  # 2 micro-steps x 2 ranks
        assert 0 < sparse["rows_per_layer"] < full["rows_per_layer"]
        assert sparse["bytes_per_step"] == sparse["rows_per_layer"] * 2 * 4 * (2 * 2 * 2 * 16) * 4


def test_pattern_keys_reach_the_converted_model():
    cfg = load_config(train_py.TrainConfig, ROOT / "configs/tiny.yaml", ["pattern.window=40", "pattern.n_sink=0"])
    tok = type("Tok", (), {"n_vocab": 512})
    model_cfg = train_py.model_config(cfg, train_py.base_model(cfg, tok)[0])
    assert (model_cfg.pattern_params["window"], model_cfg.pattern_params["n_sink"]) == (40, 0)
    assert "sink_window" in model_cfg.layer_kinds
    plain = load_config(train_py.TrainConfig, ROOT / "configs/tiny.yaml")
    default = train_py.model_config(plain, train_py.base_model(plain, tok)[0])
    assert default.pattern_params["window"] != 40


@pytest.mark.parametrize("override, message", [
    ("out_dir=README.md", "out_dir README.md is a file; set out_dir to a directory"),
    ("cp_degree=3", "seq_len must be a multiple of 2 * cp_degree"),
    ("cp_degree=2", "cp_degree=2 must divide the number of processes (1)"),
    ("cp_exchange=ring", "cp_exchange must be pattern or allgather"),
    ("lrr=1", "Unknown config key lrr"),
    ("lr=fast", "lr must be float"),
    ("data.pathz=[x]", "Unknown config key data.pathz"),
    ("baseline=half", "baseline must be longgen or full"),
    ("pattern.window=0", "pattern.window=0 must be an integer of at least 1"),
    ("pattern.windw=8", "unknown pattern parameter pattern.windw"),
])
def test_bad_config_is_one_sentence(override, message, capsys, monkeypatch):
    """In this process, through errors.run_cli as `python train.py` runs main (the command line itself, status 2 and
    no traceback: test_a_bad_config_on_the_command_line_is_one_sentence)."""
    err = refused_in_process(["--config", "configs/tiny.yaml", override], capsys, monkeypatch)
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def refused_in_process(argv, capsys, monkeypatch) -> str:
    """What `python train.py ARGV` prints when it exits with status 2, run here (run_cli + train.main, in ROOT)."""
    monkeypatch.chdir(ROOT)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # a plain run sets them: undone
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    with pytest.raises(SystemExit) as exited:  # anything but a UserError escapes run_cli and fails the test
        run_cli(lambda: train_py.main(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_a_bad_config_on_the_command_line_is_one_sentence():
    """`python train.py` with a mistake found after the process group is up (cp_degree): one line, status 2."""
    done = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", "cp_degree=2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "cp_degree=2 must divide the number of processes (1)" in done.stderr


def test_existing_run_is_not_overwritten(tmp_path, corpus, uninterrupted, capsys, monkeypatch):
    out, _ = uninterrupted
    err = refused_in_process(["--config", "configs/tiny.yaml", f"out_dir={out}", f"data.paths=[{corpus / 'novels'}]"],
                             capsys, monkeypatch)
    assert "--resume" in err


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


# ------------------------------------------------------------------------------------------------ bad input, up front
@pytest.mark.parametrize("overrides, message", [
    (["eval_every=1"], "eval_every needs held-out documents: set data.eval_fraction above 0"),  # it failed after a step
    (["log_every=0"], "log_every and eval_batches must be at least 1"),
    (["eval_every=2", "data.eval_fraction=0.1", "eval_batches=0"], "log_every and eval_batches must be at least 1"),
    (["keep_checkpoints=-1"], "keep_checkpoints must be 0 or more"),  # it left no checkpoint at all
    (["save_every=-3"], "save_every, eval_every and keep_checkpoints must be 0 or more"),
    (["lr=nan"], "Config key lr must be a finite number"),
])
def test_bad_values_are_refused_before_any_work(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(train_py.TrainConfig, ROOT / "configs/tiny.yaml", overrides)


@pytest.mark.parametrize("text, value", [("1e-5", 1e-5), ("2E-5", 2e-5), ("5e-05", 5e-5), (".5", 0.5), ("3", 3.0),
                                         ("1.0e5", 1e5), ("-1e-3", -1e-3)])
def test_float_keys_take_every_number_a_user_types(text, value):
    assert load_config(train_py.TrainConfig, None, [f"weight_decay={text}"]).weight_decay == value


def test_float_keys_in_the_yaml_file_too(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-5\nfull_fraction: .5\n")
    cfg = load_config(train_py.TrainConfig, tmp_path / "c.yaml")
    assert (cfg.lr, cfg.full_fraction) == (1e-5, 0.5)


def test_the_readmes_override_examples_work_as_written(capsys):
    """README's train section and train.py --help show overrides (`lr=1e-5` was refused); each loads as written."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n- Config:")
    examples = [item for code in re.findall(r"`([^`]+=[^`]+)`", readme[start:readme.index("\n- ", start + 1)])
                for item in code.split()]
    with pytest.raises(SystemExit):
        train_py.main(["--help"])
    examples += re.search(r"e\.g\.\s+(\S+)\s+(\S+)", capsys.readouterr().out).groups()
    assert examples.count("lr=1e-5") == 2 and len(examples) >= 6, examples
    for example in examples:
        load_config(train_py.TrainConfig, ROOT / "configs/tiny.yaml", [example])


# ------------------------------------------------------------------------------------------------ faults
@pytest.fixture(scope="module")
def small(tmp_path_factory, corpus):
    """One process, two steps, a checkpoint after each: step_1, step_2, final."""
    out = tmp_path_factory.mktemp("runs") / "small"
    records = train(out, corpus, "steps=2", "save_every=1", nproc=1)
    assert [d.name for d in checkpoint.checkpoint_dirs(out)] == ["step_1", "step_2"]
    return out, losses(records)


def copy_of(small, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(small[0], out)
    return out


def test_a_second_run_on_a_held_out_dir_is_refused(tmp_path, corpus):
    """Two runs on one out_dir both ran to the end, the second overwriting the first's checkpoints."""
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # as the first run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 12345 on elsewhere")
        held.flush()
        done = one_process(out, corpus)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"error: {out} is in use by another train.py run (pid 12345 on elsewhere)" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written


KILL_WHEN_REMOVING_A_CHECKPOINT = """
import os, re, shutil, signal, sys
sys.path.insert(0, ".")
real_rmtree = shutil.rmtree

def rmtree(path, *args, **kwargs):  # kill -9 part of the way through removing a complete checkpoint
    name = os.path.basename(os.fspath(path))
    if re.fullmatch(r"step_[0-9]+", name) and os.path.isfile(os.path.join(path, "train.json")):
        os.remove(os.path.join(path, "train.json"))
        os.kill(os.getpid(), signal.SIGKILL)
    real_rmtree(path, *args, **kwargs)

shutil.rmtree = rmtree
import errors, train
errors.run_cli(lambda: train.main(sys.argv[1:]))
"""


def test_resuming_a_finished_run_never_loses_its_checkpoint(tmp_path, corpus, small):
    """keep_checkpoints=1, --resume of a finished run: it re-saved step_N, removing the one complete checkpoint
    before its replacement was in place; a kill -9 then left nothing to resume from."""
    out = copy_of(small, tmp_path)
    shutil.rmtree(out / "step_1")  # keep_checkpoints=1: one checkpoint
    shutil.rmtree(out / "final")
    done = one_process(out, corpus, "steps=2", "keep_checkpoints=1", "--resume",
                       driver=KILL_WHEN_REMOVING_A_CHECKPOINT)
    found = checkpoint.checkpoint_dirs(out)
    assert [d.name for d in found] == ["step_2"] and checkpoint.inspect(found[-1]) is None, done.stderr[-2000:]
    assert done.returncode == 0 and (out / "final" / "longgen.json").is_file()  # and it exported the model


def test_a_planted_metadata_pickle_is_refused_without_running(tmp_path, corpus, small):
    out = copy_of(small, tmp_path)
    ran = tmp_path / "payload_ran"
    (out / "step_2" / ".metadata").write_bytes(pickle.dumps(Payload(ran)))
    done = one_process(out, corpus, "--resume")
    assert not ran.exists(), "the planted pickle ran"
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"Checkpoint {out / 'step_2'} is damaged (its .metadata is not a checkpoint's: it names posix.system" \
        in done.stderr and "continue from step_1" in done.stderr


class Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_damaged_checkpoint_is_named_and_the_last_good_one_taken_when_asked(tmp_path, corpus, small):
    """A truncated shard gave a traceback. Now: one sentence, and with --resume-from-last-good the run continues
    from step_1 exactly as the uninterrupted run went on, with one metrics record per step."""
    out = copy_of(small, tmp_path)
    shard = out / "step_2" / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size // 2])
    done = one_process(out, corpus, "steps=2", "--resume")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (f"error: Checkpoint {out / 'step_2'} is damaged (its __0_0.distcp is truncated: {size // 2:,} of "
            f"{size:,} bytes); pass --resume-from-last-good to continue from step_1") in done.stderr
    done = one_process(out, corpus, "steps=2", "--resume-from-last-good")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step_2 is damaged" in done.stderr and (out / "step_2.damaged").is_dir()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # step 2's first record went with its checkpoint
    assert [r["resumed_at"] for r in records if r.get("event") == "setup"] == [0, 1]
    assert losses(records) == small[1]  # step 2 again, bit for bit
    assert checkpoint.inspect(out / "step_2") is None


def test_more_processes_than_gpus_is_one_sentence(monkeypatch):
    """torchrun --nproc_per_node=4 on a machine of 2 GPUs: the third process says so before touching CUDA."""
    monkeypatch.setattr(train_py.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train_py.torch.cuda, "device_count", lambda: 2)
    for key, value in dict(RANK="2", LOCAL_RANK="2", WORLD_SIZE="4", LOCAL_WORLD_SIZE="4").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(train_py.UserError, match="4 processes on this machine but only 2 GPUs; start at most "
                                                 "--nproc_per_node=2"):
        train_py.init_distributed()


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
