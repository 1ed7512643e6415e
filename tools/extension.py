"""The 8K -> 32K extension of EVALUATION.md: train several arms of SmolLM2 with the same data, order and schedule, one
arm per GPU at a time, and evaluate each exported model as soon as it is trained (evaluations share the GPU that
trained it). Run from the repository root:

    python tools/extension.py --gpus 0,1 --arms full longgen-calibrated longgen-middle --evictions [--before-question]
    python tools/extension.py --gpus 0,1 --arms "window4096=placement=calibrated \
        full_layers=[5,6,7,14,17,18,20,21,23,24] pattern.window=4096" "steps300=placement=calibrated \
        full_layers=[5,6,7,14,17,18,20,21,23,24] steps=300 grad_accum=8"
    python tools/extension.py --smoke            # a CPU dry run at toy sizes: every command once
    python tools/extension.py --speed 30 --arms full longgen-calibrated   # tokens/s side by side, no evaluation

An arm is a name from ARMS or NAME=train.py overrides. Everything goes under --runs (runs/extension): each arm's
train.py out_dir, eval.py reports in eval/ARM/{retrieval,rest}, logs in logs/, and status.json (what runs, what is
done, with commands and seconds), rewritten as jobs start and end. Each arm's reports are joined into one
(`eval.py --merge`) in eval/ARM/ once its evaluations are done: the results.json, results.md and heatmaps that
EVALUATION.md keeps in docs/eval/extension/ARM/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

CALIBRATED = "[5,6,7,14,17,18,20,21,23,24]"  # calibrate.py's greedy pick for SmolLM2 (docs/calibration/)
ARMS = {"full": ["--baseline", "full"],
        "longgen-middle": ["placement=middle", "full_layers=[]"],
        "longgen-calibrated": ["placement=calibrated", f"full_layers={CALIBRATED}"],
        "longgen-calibrated-strided": ["sparse=strided", "placement=calibrated",
                                       "full_layers=[7,13,14,16,17,18,20,21,23,24]"]}
DATA = ["data/corpus/books", "data/corpus/python-docs", "data/corpus/linux-docs"]
TRAIN = ["--config", "configs/smollm2-32k.yaml", "steps=200", "grad_accum=4", "warmup_steps=20", "eval_every=50",
         "save_every=50"]
REST = ("ruler/niah_single_1,ruler/niah_single_2,ruler/niah_multikey_1,ruler/niah_multivalue,ruler/vt,babilong/qa1,"
        "babilong/qa2")
SMOKE_TRAIN = ["steps=2", "grad_accum=1", "seq_len=1024", "eval_every=0", "save_every=0", "compile=false",
               "dtype=float32", "pattern.window=32", "warmup_steps=1"]


def write_json(path: Path, obj) -> None:
    """Whole or not at all: a reader (or a run cut off mid-write) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


class Runner:
    """Jobs as subprocesses with their logs and a status file; evaluations limited to `slots` at once per GPU."""

    def __init__(self, runs: Path, gpus: list[str], slots: int):
        self.runs, self.gpus = runs, gpus
        (runs / "logs").mkdir(parents=True, exist_ok=True)
        self.status, self.lock, self.threads = {}, threading.Lock(), []
        self.slots = {gpu: threading.Semaphore(slots) for gpu in gpus}
        self.launched: dict[str, threading.Thread] = {}  # queued job's name -> its thread, for merges to wait on

    def save(self):
        with self.lock:
            write_json(self.runs / "status.json", self.status)

    def run(self, name: str, cmd: list[str], gpu: str) -> int:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpu != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = gpu
        self.status[name] = dict(state="running", gpu=gpu, cmd=" ".join(cmd), start=time.time())
        self.save()
        with open(self.runs / "logs" / f"{name}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        self.status[name].update(state="done" if rc == 0 else f"failed (exit {rc})",
                                 seconds=round(time.time() - self.status[name]["start"]))
        self.save()
        return rc

    def later(self, name: str, cmd: list[str], gpu: str) -> str:
        """Queue a job (at most `slots` at once on its GPU); returns its name."""
        self.status[name] = dict(state="queued", gpu=gpu)

        def go():
            with self.slots[gpu]:
                self.run(name, cmd, gpu)
        self.threads.append(threading.Thread(target=go))
        self.threads[-1].start()
        self.launched[name] = self.threads[-1]
        return name

    def merge(self, name: str, parts: list[str], cmd: list[str]):
        """When the jobs `parts` (queued with later()) are done and all succeeded: eval.py --merge of their reports."""
        def go():
            for part in parts:
                self.launched[part].join()
            if all(self.status[part]["state"] == "done" for part in parts):
                self.run(name, cmd, "cpu")
            else:
                self.status[name] = dict(state="skipped (a part failed)", gpu="cpu")
                self.save()
        self.status[name] = dict(state="queued", gpu="cpu")
        self.threads.append(threading.Thread(target=go))
        self.threads[-1].start()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS),
                   help=f"arms to train: {', '.join(ARMS)}, or NAME=overrides")
    p.add_argument("--gpus", default="0", help="GPUs to spread the arms over, one arm per GPU at a time (e.g. 0,1)")
    p.add_argument("--runs", default="runs/extension", help="where everything goes")
    p.add_argument("--lengths", default="8k,16k,32k", help="evaluation lengths")
    p.add_argument("--samples", type=int, default=10, help="passkey and niah prompts per length and needle depth (5 "
                   "depths): 10 makes 50 per cell, where two cells' difference has a standard error of ~10 points")
    p.add_argument("--rest", action=argparse.BooleanOptionalAction, default=True,
                   help="also the RULER and BABILong tasks (20 samples each), not only passkey and niah")
    p.add_argument("--evictions", action="store_true", help="after the full arm: StreamingLLM, SnapKV and H2O at the "
                   "10-full-layer arms' total KV bytes, one length at a time")
    p.add_argument("--before-question", action="store_true", help="with --evictions: also SnapKV and H2O compressed "
                   "before the question is read (eval.py --compress-before-question; arms full+snapkv-before-question, "
                   "full+h2o-before-question)")
    p.add_argument("--speed", type=int, metavar="STEPS", help="instead: train each arm STEPS steps, one after another "
                   "on the first GPU (nothing else on it), and compare their median tokens/s (steps 6 on) side by side")
    p.add_argument("--slots", type=int, default=4, help="evaluations at once per GPU")
    p.add_argument("--smoke", action="store_true", help="a CPU dry run at toy sizes")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    py = sys.executable
    if args.samples < 1:
        sys.exit(f"error: --samples {args.samples}: give 1 or more prompts per length and depth.")
    if args.speed is not None and args.speed < 7:
        sys.exit(f"error: --speed {args.speed} leaves no step after the first 5 (they compile); give 7 or more.")
    arms = dict(a.split("=", 1) if "=" in a else (a, None) for a in args.arms)
    unknown = [a for a, extra in arms.items() if extra is None and a not in ARMS]
    if unknown:
        sys.exit(f"error: unknown arm {unknown[0]!r}; name one of {', '.join(ARMS)} or give NAME=overrides.")
    arms = {a: ARMS[a] if extra is None else extra.split() for a, extra in arms.items()}
    gpus = ["cpu"] if args.smoke else args.gpus.split(",")
    train = TRAIN + (SMOKE_TRAIN if args.smoke else ["data.num_proc=16"])
    lengths = "1k" if args.smoke else args.lengths
    retrieval = ["--samples", "1", "--depths", "1"] if args.smoke else ["--samples", str(args.samples), "--depths", "5"]
    rest = ["--samples", "1" if args.smoke else "20"]
    evict = ["--samples", "1", "--depths", "1"] if args.smoke else ["--samples", "4", "--depths", "5"]
    kept = 64 + (32 if args.smoke else 2048)  # a sparse layer's sinks + window
    runs = Path(args.runs)
    jobs = Runner(runs, gpus, 1 if args.smoke else args.slots)

    def merged(name: str, parts: dict[str, str]):
        """The reports in eval/NAME/DIR/ (parts: DIR -> the job writing it) joined into one in eval/NAME/ when all
        are done: the report EVALUATION.md commits as docs/eval/extension/NAME/."""
        out = runs / "eval" / name
        jobs.merge(f"merge-{name}", list(parts.values()),
                   [py, "eval.py", "--merge", *(str(out / p) for p in parts), "--out", str(out), "--overwrite"])

    def evaluate(arm: str, gpu: str):
        base = [py, "eval.py", "--checkpoint", str(runs / arm / "final"), "--lengths", lengths, "--batch", "4"]
        parts = {"retrieval": jobs.later(f"eval-{arm}-retrieval", base + ["--tasks", "passkey,niah", *retrieval,
                                         "--out", str(runs / "eval" / arm / "retrieval")], gpu)}
        if args.rest:
            parts["rest"] = jobs.later(f"eval-{arm}-rest", base + ["--tasks", REST, *rest, "--out",
                                                                  str(runs / "eval" / arm / "rest")], gpu)
        merged(arm, parts)
        if arm == "full" and args.evictions:
            policies = [(p, "") for p in ("streaming", "snapkv", "h2o")]
            policies += [(p, "-before-question") for p in ("snapkv", "h2o") if args.before_question]
            for policy, when in policies:
                parts = {}
                for length in lengths.split(","):
                    budget = math.ceil((10 * int(length[:-1]) * 1024 + 20 * kept) / 30)  # 10 of 30 layers full
                    batch = ["--batch", "4"] if policy == "streaming" else []  # the others: a prompt at a time
                    batch += ["--compress-before-question"] if when else []
                    parts[length] = jobs.later(
                        f"eval-full+{policy}{when}-{length}",
                        [py, "eval.py", "--checkpoint", str(runs / "full" / "final"), "--layout", "full",
                         "--kv-policy", policy, "--kv-budget", str(budget), "--tasks", "passkey,niah",
                         "--lengths", length, *evict, *batch, "--out",
                         str(runs / "eval" / f"full+{policy}{when}" / length)], gpu)
                merged(f"full+{policy}{when}", parts)

    if args.speed is not None:
        sys.exit(speed(jobs, arms, train, gpus[0], args.speed))
    queue, qlock = list(arms), threading.Lock()

    def lane(gpu: str):
        while True:
            with qlock:
                if not queue:
                    return
                arm = queue.pop(0)
            if jobs.run(f"train-{arm}", [py, "train.py", *train, f"out_dir={runs / arm}", *arms[arm]], gpu) == 0:
                evaluate(arm, gpu)

    lanes = [threading.Thread(target=lane, args=(gpu,)) for gpu in gpus]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    for t in list(jobs.threads):
        t.join()
    failed = {name: s["state"] for name, s in jobs.status.items() if s["state"] != "done"}
    print(json.dumps(jobs.status, indent=1) if failed else f"All {len(jobs.status)} jobs done; see {runs}/status.json.")
    sys.exit(1 if failed else 0)


def speed(jobs: Runner, arms: dict[str, list[str]], train: list[str], gpu: str, steps: int) -> int:
    """Each arm trained `steps` steps on one GPU, one after another; a table of median tokens/s over steps 6 on (the
    first ones compile), with each arm's ratio to full attention's when `full` is among the arms; speed.json."""
    short = [f"steps={steps}", f"warmup_steps={min(20, steps // 10)}", "eval_every=0", "save_every=0"]
    rows = {}
    for arm, overrides in arms.items():
        out = jobs.runs / f"speed-{arm}"
        if jobs.run(f"speed-{arm}", [sys.executable, "train.py", *train, *short, f"out_dir={out}", *overrides],
                    gpu) != 0:
            print(f"{arm}: training failed; see {jobs.runs}/logs/speed-{arm}.log", file=sys.stderr)
            continue
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        tok_s = sorted(r["tokens_per_s"] for r in lines if "tokens_per_s" in r and r["step"] >= 6)
        rows[arm] = dict(tokens_per_s=tok_s[len(tok_s) // 2], steps=len(tok_s))
    base = rows.get("full", {}).get("tokens_per_s")
    print(f"| arm | tokens/s (median of steps 6-{steps}) |" + (" vs full |" if base else ""))
    print("|---|---|" + ("---|" if base else ""))
    for arm, r in rows.items():
        r["vs_full"] = round(r["tokens_per_s"] / base, 3) if base else None
        print(f"| {arm} | {r['tokens_per_s']:,.0f} |" + (f" {r['vs_full']:.2f}x |" if base else ""))
    write_json(jobs.runs / "speed.json", dict(gpu=gpu, steps=steps, arms=rows))
    return 0 if len(rows) == len(arms) else 1


if __name__ == "__main__":
    main()
