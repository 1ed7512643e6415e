"""training/checkpoint.py in one process: a checkpoint is whole or absent, damage is named, nothing in one is
unpickled, and one run holds an out_dir at a time. (End-to-end runs of train.py are in test_train.py.)"""
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from training import checkpoint
import train as train_py
from training.config import load_config
from conftest import ROOT
from errors import UserError


@dataclass
class Cfg:
    keep_checkpoints: int = 2


class Stream:
    """What save_checkpoint asks of the data stream."""

    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class Payload:
    """Unpickling this runs `touch path`: what a planted pickle would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def parts(seed: int = 0, width: int = 8):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), Stream(seed)


def save(out, step, keep=2):
    checkpoint.save_checkpoint(out, step, *parts(step), Cfg(keep))


def names(out):
    return sorted(p.name for p in out.iterdir() if p.name != checkpoint.LOCK_FILE)


def test_a_save_is_whole_and_loads_back(tmp_path, group):
    save(tmp_path, 3)
    assert names(tmp_path) == ["step_3"] and checkpoint.inspect(tmp_path / "step_3") is None
    model, optimizer, scheduler, stream = parts(seed=7)
    assert checkpoint.load_checkpoint(tmp_path / "step_3", model, optimizer, scheduler, stream) == 3
    saved = parts(seed=3)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    assert stream.position == 3


@pytest.mark.parametrize("keep, left", [(1, ["step_3"]), (2, ["step_2", "step_3"]),
                                        (0, ["step_1", "step_2", "step_3"])])  # 0 keeps all
def test_keep_checkpoints(tmp_path, group, keep, left):
    for step in (1, 2, 3):
        save(tmp_path, step, keep)
    assert names(tmp_path) == left


def test_negative_keep_checkpoints_is_refused():
    """keep_checkpoints=-1 used to keep none at all: the run ended with no checkpoint."""
    with pytest.raises(UserError, match="keep_checkpoints must be 0 or more"):
        load_config(train_py.TrainConfig, ROOT / "configs/tiny.yaml", ["keep_checkpoints=-1"])


def test_a_replaced_checkpoint_is_never_lost(tmp_path, group, monkeypatch):
    """Saving step_2 again (a run resumed from a damaged step_2's predecessor) replaces it: crashed between moving
    the old one aside and putting the new one in place, the old one comes back at the next start."""
    save(tmp_path, 2)
    before = (tmp_path / "step_2" / "rank0.json").read_text()
    real_replace = os.replace

    def crash_before_the_new_one_is_in_place(src, dst):
        if str(dst).endswith("step_2") and str(src).endswith(".tmp"):
            raise KeyboardInterrupt  # nothing cleans up after a kill -9 either
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_before_the_new_one_is_in_place)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 2, *parts(9), Cfg(1))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "step_2").exists()  # the moment in between ...
    checkpoint.recover(tmp_path)  # ... is undone at the next start
    assert names(tmp_path) == ["step_2"] and checkpoint.inspect(tmp_path / "step_2") is None
    assert (tmp_path / "step_2" / "rank0.json").read_text() == before


def damage_shard(d):
    shard = d / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])


DAMAGE = {
    "truncated shard": (damage_shard, "its __0_0.distcp is truncated: 1,000 of"),
    "truncated metadata": (lambda d: (d / ".metadata").write_bytes((d / ".metadata").read_bytes()[:200]),
                           "its .metadata is truncated"),
    "empty train.json": (lambda d: (d / "train.json").write_text(""), "its train.json is empty"),
    "missing rank0.json": (lambda d: (d / "rank0.json").unlink(), "its rank0.json is missing"),
    "missing shard": (lambda d: (d / "__0_0.distcp").unlink(), "its __0_0.distcp is missing"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_offered(tmp_path, group, kind):
    damage, says = DAMAGE[kind]
    save(tmp_path, 1)
    save(tmp_path, 2)
    damage(tmp_path / "step_2")
    with pytest.raises(UserError) as e:
        checkpoint.open_run(tmp_path, resume=True)
    assert f"{tmp_path / 'step_2'} is damaged ({says}" in str(e.value)
    assert "--resume-from-last-good to continue from step_1" in str(e.value)
    lock, latest = checkpoint.open_run(tmp_path, resume=True, fall_back=True)  # the user asked for it
    lock.close()
    assert latest == tmp_path / "step_1" and names(tmp_path) == ["step_1", "step_2.damaged"]


def test_no_whole_checkpoint_to_fall_back_to(tmp_path, group):
    save(tmp_path, 1)
    damage_shard(tmp_path / "step_1")
    with pytest.raises(UserError, match="no whole checkpoint precedes it"):
        checkpoint.open_run(tmp_path, resume=True, fall_back=True)


def test_a_planted_metadata_pickle_does_not_run(tmp_path, group):
    save(tmp_path, 1)
    save(tmp_path, 2)
    ran = tmp_path / "payload_ran"
    (tmp_path / "step_2" / ".metadata").write_bytes(pickle.dumps(Payload(ran)))
    with pytest.raises(UserError, match=r"its \.metadata is not a checkpoint's: it names posix\.system"):
        checkpoint.open_run(tmp_path, resume=True)
    with pytest.raises(UserError, match="is damaged"):
        checkpoint.load_checkpoint(tmp_path / "step_2", *parts())
    assert not ran.exists()
    try:
        dcp.load({"model": {}}, checkpoint_id=tmp_path / "step_2")  # what torch's own reader does with it: runs it
    except BaseException:  # noqa: B036  (then fails on what the payload returned: CheckpointException)
        pass
    assert ran.exists()


def test_a_planted_pickle_in_a_shard_does_not_run(tmp_path):
    """DCP keeps non-tensor values (the optimizer's settings) as pickles in its shards, and torch reads them with the
    full unpickler."""
    ran = tmp_path / "payload_ran"
    dcp.save({"lr": Payload(ran)}, checkpoint_id=tmp_path / "ckpt")
    assert not ran.exists()
    with pytest.raises(UserError, match="not plain data"):
        checkpoint.load_state({"lr": 0.1}, tmp_path / "ckpt")
    assert not ran.exists()
    dcp.load({"lr": 0.1}, checkpoint_id=tmp_path / "ckpt")  # torch's own planner: runs it
    assert ran.exists()


def test_plain_values_in_shards_still_load(tmp_path):
    value = {"lr": 0.25, "betas": (0.9, 0.95), "params": ["a.weight", "b.bias"], "fused": None, "amsgrad": False}
    dcp.save({"group": value}, checkpoint_id=tmp_path / "ckpt")
    state = {"group": {k: None for k in value}}
    checkpoint.load_state(state, tmp_path / "ckpt")
    assert state == {"group": value}


def test_a_checkpoint_of_another_model_is_one_sentence(tmp_path):
    dcp.save({"model": torch.nn.Linear(8, 8).state_dict()}, checkpoint_id=tmp_path / "ckpt")
    with pytest.raises(UserError, match=r"does not load into this model \(Size mismatch between saved "
                                        r"torch.Size\(\[8, 8\]\) and current: torch.Size\(\[16, 8\]\)"):
        checkpoint.load_state({"model": torch.nn.Linear(8, 16).state_dict()}, tmp_path / "ckpt")


def test_a_second_run_on_the_same_out_dir_is_refused(tmp_path):
    first = checkpoint.lock_out_dir(tmp_path)
    with pytest.raises(UserError, match=f"is in use by another train.py run \\(pid {os.getpid()} on "):
        checkpoint.lock_out_dir(tmp_path)
    first.close()
    checkpoint.lock_out_dir(tmp_path).close()


def test_a_killed_run_does_not_leave_its_lock_behind(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from training import checkpoint; "
                               "lock = checkpoint.lock_out_dir(Path(sys.argv[1])); print('locked', flush=True); "
                               "time.sleep(300)", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            checkpoint.lock_out_dir(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs
        holder.wait()
    checkpoint.lock_out_dir(tmp_path).close()


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(UserError, match="is a file; set out_dir to a directory"):
        checkpoint.make_out_dir(tmp_path / "run")


def test_a_full_disk_is_recognised(tmp_path):
    """torch's writer loses the OSError on a full disk; the failure reaches us as `unexpected pos` inside a
    CheckpointException (one per rank)."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as e:
        error = CheckpointException("save failed", {0: (e, None)})
    assert checkpoint.disk_full(error, tmp_path)
    assert not checkpoint.disk_full(RuntimeError("unexpected pos 704 vs 598"), tmp_path)  # this disk has room


FULL_DISK = """
import sys
from pathlib import Path
import torch.distributed as dist
sys.path[:0] = [".", "tests"]
import test_checkpoint as t
from errors import UserError
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
out = Path(sys.argv[1])
t.checkpoint.save_checkpoint(out, 1, *t.parts(1, width=256), t.Cfg(2))  # about 0.8 MB
try:
    t.checkpoint.save_checkpoint(out, 2, *t.parts(2, width=256), t.Cfg(2))  # does not fit beside it
except UserError as e:
    print(e)
print(t.names(out), t.checkpoint.inspect(out / "step_1"))
"""


def test_a_full_disk_is_one_sentence_and_keeps_the_last_checkpoint(tmp_path):
    """A real full disk: a 1.2 MB tmpfs, mounted in a user namespace (skipped where that is not allowed)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
            capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (unshare -rm)")
    (tmp_path / "full_disk.py").write_text(FULL_DISK)
    out = tmp_path / "disk"
    out.mkdir()
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=1200k tmpfs {out} && exec '
                           f'"{sys.executable}" {tmp_path / "full_disk.py"} {out}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    message, left = done.stdout.splitlines()
    assert message.startswith(f"The disk holding {out} is full: step_2 could not be saved")
    assert "step_1, the last complete checkpoint, is intact" in message
    assert left == "['step_1'] None"  # the partial save is removed; step_1 is whole
