"""train.py's checkpoints (torch.distributed.checkpoint): save, check, load and prune them, and the lock that keeps
two runs out of one out_dir.

    out_dir/.lock          held (flock) by rank 0 for the run's life
    out_dir/step_N/        .metadata and __R_0.distcp (DCP), rankR.json (data position, RNG), train.json (last)
    out_dir/step_N.tmp/    a save in progress: renamed to step_N only once it is whole

Nothing here unpickles what a user can hand us with the full unpickler: a checkpoint directory is as untrusted as any
other file. DCP's `.metadata` is a pickle; it is read by an unpickler that knows only the checkpoint format's own
classes, and the small non-tensor values DCP stores in its shards (the optimizer's settings) by torch's weights-only
unpickler. A planted pickle is refused without running.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import re
import shutil
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from loading import weights
from errors import UserError

LOCK_FILE = ".lock"


# ------------------------------------------------------------------------------------------------ out_dir
def open_run(out_dir: Path, resume: bool, fall_back: bool = False):
    """On every rank: (the lock, or None off rank 0; the checkpoint to continue from, or None). Rank 0 makes out_dir,
    locks it for the run's life (keep the lock object alive), puts back or removes what an interrupted save left, and
    picks the newest checkpoint after checking that it is whole. A damaged newest one is an error that names the
    damage and the newest whole one before it; with `fall_back` that one is taken, and the damaged ones are renamed
    `step_N.damaged`. Rank 0's verdict, or its error, reaches every rank."""
    lock, verdict = None, None
    if dist.get_rank() == 0:
        try:
            make_out_dir(out_dir)
            lock = lock_out_dir(out_dir)
            recover(out_dir)
            verdict = ("ok", _pick(out_dir, resume, fall_back))
        except UserError as e:
            verdict = ("error", str(e))
    box = [verdict]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        if lock is not None:
            lock.close()
        raise UserError(value)
    return lock, (Path(value) if value else None)


def make_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"out_dir {out_dir} is a file; set out_dir to a directory (a new one, or an earlier run's).")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot make out_dir {out_dir} ({e.strerror}); set out_dir to a directory you can "
                        "write.") from None


def lock_out_dir(out_dir: Path):
    """An exclusive flock on out_dir/.lock, held while the returned file stays open.

    flock rather than a pid file: the kernel drops the lock when the holder's file is closed, which happens however
    the process ends (kill -9 and out-of-memory kills included), so a dead run never leaves it stuck, and no pid has to
    be checked for liveness (which cannot see processes on other hosts sharing the filesystem, and is fooled by a
    reused pid). The file is never deleted: deleting a lock file races with a process about to lock it."""
    try:
        f = open(out_dir / LOCK_FILE, "a+")
    except OSError as e:
        raise UserError(f"Cannot write {out_dir / LOCK_FILE} ({e.strerror}); set out_dir to a directory you can "
                        "write.") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{out_dir} is in use by another train.py run ({holder}); wait for it to end, or set out_dir "
                        "elsewhere.") from None
    except OSError as e:  # a filesystem without locks: run unprotected rather than not at all
        print(f"warning: cannot lock {out_dir} ({e.strerror}); make sure no other run uses it.", file=sys.stderr)
        return f
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def recover(out_dir: Path) -> None:
    """Rank 0, under the lock: a replaced checkpoint whose replacement did not get into place comes back, and
    half-written saves (`step_N.tmp`) go."""
    for old in out_dir.glob(".step_*.old"):
        weights.clean_leftovers(out_dir / old.name[1:-4])
    for tmp in out_dir.glob("step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def _pick(out_dir: Path, resume: bool, fall_back: bool) -> str | None:
    found = checkpoint_dirs(out_dir)
    if not resume:
        if found:
            raise UserError(f"{out_dir} already holds checkpoints; pass --resume to continue, or set out_dir "
                            "elsewhere.")
        return None
    if not found:
        raise UserError(f"No complete checkpoint in {out_dir} to resume from; run without --resume.")
    damaged, good = [], None
    for directory in reversed(found):
        if (problem := inspect(directory)) is None:
            good = directory
            break
        damaged.append((directory, problem))
    if damaged and not (fall_back and good):
        newest, problem = damaged[0]
        offer = (f"pass --resume-from-last-good to continue from {good.name}, the newest whole one (the damaged ones "
                 "are then renamed step_N.damaged)" if good else
                 "no whole checkpoint precedes it: move it away and run without --resume to start again")
        raise UserError(f"Checkpoint {newest} is damaged ({problem}); {offer}.")
    for directory, problem in damaged:
        aside = directory.with_name(f"{directory.name}.damaged")
        n = 1
        while aside.exists():
            n += 1
            aside = directory.with_name(f"{directory.name}.damaged{n}")
        os.replace(directory, aside)
        print(f"Checkpoint {directory.name} is damaged ({problem}): renamed {aside.name}; continuing from "
              f"{good.name}.", file=sys.stderr)
    return str(good)


# ------------------------------------------------------------------------------------------------ finding and checking
def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. `step_N.tmp` (a save that did not finish) and directories without their
    metadata are not checkpoints."""
    dirs = [d for d in out_dir.glob("step_*") if re.fullmatch(r"step_\d+", d.name)
            and (d / ".metadata").is_file() and (d / "train.json").is_file()]
    return sorted(dirs, key=lambda d: int(d.name[5:]))


def inspect(directory: Path) -> str | None:
    """What is wrong with a checkpoint, in a few words, or None if it is whole: its JSON files parse and hold their
    keys, its metadata is a checkpoint's own, and every file the metadata names holds the bytes it should. (The
    contents are not checksummed: DCP keeps no checksums.)"""
    meta, problem = _read_json(directory / "train.json", ("step", "scheduler", "world_size"))
    if problem:
        return problem
    if not (isinstance(meta["step"], int) and isinstance(meta["world_size"], int) and meta["world_size"] >= 1):
        return "its train.json is damaged (step or world_size is not a number)"
    for rank in range(meta["world_size"]):
        if problem := _read_json(directory / f"rank{rank}.json", ("data", "rng"))[1]:
            return problem
    try:
        metadata = read_metadata(directory / ".metadata")
    except UserError as e:
        return str(e)
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        path = directory / name
        if not path.is_file():
            return f"its {name} is missing"
        if (have := path.stat().st_size) < size:
            return f"its {name} is truncated: {have:,} of {size:,} bytes"
    return None


def _read_json(path: Path, keys: tuple[str, ...]) -> tuple[dict | None, str | None]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, f"its {path.name} is missing"
    if not text.strip():
        return None, f"its {path.name} is empty"
    try:
        value = json.loads(text)
    except ValueError:
        return None, f"its {path.name} is not valid JSON (truncated?)"
    if not isinstance(value, dict) or not set(keys) <= set(value):
        return None, f"its {path.name} lacks {', '.join(keys)}"
    return value, None


# DCP's metadata classes, and the torch values inside them: all that a checkpoint's `.metadata` pickle names.
_METADATA_CLASSES = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "TensorProperties",
    "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")} | {
    (module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "PurePosixPath",
                                                                            "WindowsPath", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a `.metadata` file knowing only _METADATA_CLASSES and torch's dtypes, layouts and memory formats:
    any other name (os.system, builtins.eval, ...) stops it before anything is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint's metadata never does (not run)")


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """A checkpoint's `.metadata`, read without running anything in it; a UserError saying what is wrong with it."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError("its .metadata is missing") from None
    except EOFError:
        raise UserError("its .metadata is truncated") from None
    except pickle.UnpicklingError as e:
        if "truncated" in str(e):
            raise UserError("its .metadata is truncated") from None
        raise UserError(f"its .metadata is not a checkpoint's: {e}") from None
    except Exception as e:  # a damaged pickle fails in many ways
        raise UserError(f"its .metadata is damaged ({type(e).__name__})") from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(storage, dict) or not all(
            isinstance(info, _StorageInfo) and isinstance(info.relative_path, str)
            and Path(info.relative_path).name == info.relative_path and info.relative_path not in ("", ".", "..")
            for info in storage.values()):
        raise UserError("its .metadata is not a checkpoint's (its storage table names files outside the checkpoint, "
                        "or is missing)")
    return metadata


class _Reader(FileSystemReader):
    """DCP's file reader, but the metadata comes through `read_metadata`."""

    damage: UserError | None = None  # what read_metadata found wrong (DCP passes on only its text)

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        try:
            metadata = read_metadata(Path(self.path) / ".metadata")
        except UserError as e:
            self.damage = e
            raise
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(DefaultLoadPlanner):
    """DCP's load planner, but the non-tensor values in the shards are read with torch's weights-only unpickler
    (plain Python data only) instead of the full one."""

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_state(state: dict, directory: Path) -> None:
    """dcp.load of `directory` into `state` (in place) without the full unpickler; a UserError if it does not go."""
    reader = _Reader(directory)
    try:
        dcp.load(state, storage_reader=reader, planner=_Planner())
    except (Exception, CheckpointException) as e:
        causes = _causes(e)
        if reader.damage:
            raise UserError(f"Checkpoint {directory} is damaged ({reader.damage}); move it away to resume from the "
                            "one before it.") from None
        if any(isinstance(c, pickle.UnpicklingError) for c in causes):
            raise UserError(f"Checkpoint {directory} holds a value that is not plain data (not unpickled: it may be "
                            "planted); move it away to resume from the one before it.") from None
        root = next((c for c in causes if not isinstance(c, CheckpointException)), e)
        text = (str(root).strip().splitlines() or [type(root).__name__])[-1][:300]
        raise UserError(f"Checkpoint {directory} does not load into this model ({text}); resume with the config it "
                        "was saved with (its train.json records it).") from None


def _causes(error: BaseException) -> list[BaseException]:
    """The error, its causes and contexts, and the errors a CheckpointException collected from each rank."""
    found, todo = [], [error]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is f for f in found):
            continue
        found.append(e)
        if isinstance(e, CheckpointException):
            todo += [failure[0] if isinstance(failure, tuple) else failure for failure in e.failures.values()]
        todo += [e.__cause__, e.__context__]
    return found


def disk_full(error: BaseException, path: Path) -> bool:
    """Whether `error` came from a full disk (or quota): an ENOSPC/EDQUOT somewhere in it, or, since torch's writers
    lose the OSError (`unexpected pos 704 vs 598`), less than 16 MiB left where `path` lives."""
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _causes(error)):
        return True
    try:
        stat = os.statvfs(path)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < 16 << 20


# ------------------------------------------------------------------------------------------------ saving and loading
def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, stream, cfg) -> None:
    """Model, optimizer, schedule, data position and RNG of every rank into `step_N.tmp`, renamed `step_N` once
    whole; only then are older checkpoints pruned to `cfg.keep_checkpoints` (0 keeps all). A full disk is one
    sentence that names the last complete checkpoint, which stays intact; the partial save is removed."""
    rank = dist.get_rank()
    target, tmp = out_dir / f"step_{step}", out_dir / f"step_{step}.tmp"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=tmp)
        _write_json(tmp / f"rank{rank}.json", {"data": stream.state_dict(), "rng": torch.get_rng_state().tolist()})
        dist.barrier()
        if rank == 0:
            _write_json(tmp / "train.json", {"step": step, "scheduler": scheduler.state_dict(),
                                             "world_size": dist.get_world_size(), "config": asdict(cfg)})
    except (Exception, CheckpointException) as e:
        full = disk_full(e, out_dir)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise UserError(f"The disk holding {out_dir} is full: step_{step} could not be saved (its partial files "
                            f"are removed), and {last_complete(out_dir)}.") from None
        raise
    if rank == 0:
        weights.replace_dir(tmp, target)  # the checkpoint exists only once it is whole
        prune(out_dir, cfg.keep_checkpoints)
    dist.barrier()


def last_complete(out_dir: Path) -> str:
    """The end of the full-disk sentence: which checkpoint is intact, and what to do."""
    found = checkpoint_dirs(out_dir)
    if found:
        return f"{found[-1].name}, the last complete checkpoint, is intact: free some space and continue with --resume"
    return "no checkpoint is complete yet: free some space and run again"


def _write_json(path: Path, value) -> None:
    """Written and flushed to the disk (the directory is renamed into place only after)."""
    with open(path, "w") as f:
        f.write(json.dumps(value))
        f.flush()
        os.fsync(f.fileno())


def prune(out_dir: Path, keep: int) -> None:
    """Rank 0, after a save: remove all but the newest `keep` complete checkpoints (0: keep all), and directories
    named like checkpoints that are not complete ones (what a killed prune or save left)."""
    complete = checkpoint_dirs(out_dir)
    kept = set(complete[-keep:] if keep else complete)
    for d in out_dir.glob("step_*"):
        if d not in kept and d.is_dir() and re.fullmatch(r"step_\d+(\.tmp)?", d.name):
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(directory: Path, model, optimizer, scheduler, stream) -> int:
    """Restore what `save_checkpoint` saved; the step it was saved at. On as many processes as wrote it or on another
    number: DCP reshards the model and optimizer, and the data position is one global window count, the same in every
    rank's file (PackedStream), so any rank's file continues the same windows (the RNG state is read from one of them
    alike; training draws no random numbers after the initial weights). The same recipe needs the same tokens per step,
    batch_size x grad_accum x processes / cp_degree: two processes with grad_accum=2 become one with grad_accum=4."""
    meta = json.loads((directory / "train.json").read_text())
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    load_state(state, directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    scheduler.load_state_dict(meta["scheduler"])
    mine = json.loads((directory / f"rank{dist.get_rank() % meta['world_size']}.json").read_text())
    stream.load_state_dict(mine["data"])
    torch.set_rng_state(torch.tensor(mine["rng"], dtype=torch.uint8))
    return meta["step"]
