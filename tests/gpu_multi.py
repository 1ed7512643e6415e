"""train.py on two processes against one: the checks of several GPUs (NCCL), and of two CPU processes (gloo), where
nothing but the backend changes. Not collected by pytest (no test_ prefix); run it:

    python tests/gpu_multi.py [--out DIR] [--steps 20] [--jobs 8] [--only cp_strided_fp32,resume]

It writes a tiny corpus and a byte-level tokenizer into --out (nothing is fetched), then runs train.py with the tiny
preset at 512 tokens (each rank's half of a sequence is 2 mask tiles, so flex runs on GPUs), document masking on,
compiled blocks on GPUs (--compile to choose), lr 1e-3 (tiny.yaml's 3e-3 makes loss spikes that amplify bf16's
rounding differences along the run), and compares the losses of every step:
- cp_{sink_window,strided,full}_{fp32,bf16}: `torchrun --nproc_per_node=2 train.py cp_degree=2` (the pattern
  exchange) against one process of the same global batch; fp32 within 1e-4 relative, bf16 within 5e-3;
- dp_fp32: two data-parallel ranks (cp_degree=1, batch 1, grad_accum 2) against one process with grad_accum 4;
- resume: the cp_sink_window_fp32 run stopped half way (step 10) and resumed with --resume on two ranks: bit for
  bit;
- reshard_dp, reshard_cp: the half-way checkpoint of dp_fp32's (or cp_sink_window_fp32's) two ranks resumed on one
  process to step 15 (grad_accum doubled for dp: the same windows per step), then on two again to the end: within
  1e-4 of the run that never stopped.
Each check prints PASS or FAIL with the largest loss difference; the exit status is 1 if any failed. Runs go
--jobs at a time (8 on GPUs, which they share: the models are tiny); each one's output is in --out/logs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from loading.tokenizer import Tokenizer  # noqa: E402

LAYOUTS = ("sink_window", "strided", "full")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-3}  # largest relative loss difference (gloo, 20 steps: 6e-7, 8e-5)
WORDS = ("the long context of a story unfolds over many chapters and every chapter remembers the first one while "
         "sparse layers keep a window and a sink").split()


def setup(out: Path) -> tuple[Path, Path]:
    """A byte-level tokenizer (256 bytes and an end-of-text token) and 60 documents of 40 to 1,500 bytes, so that
    512-token windows hold several documents that cross the chunks of 128 tokens."""
    tok = out / "tokenizer"
    Tokenizer({bytes([b]): b for b in range(256)}, {"<|endoftext|>": 256}, r"\S+|\s+", eos_id=256).save(tok)
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(60):
        n = 8 + (i * 97) % 260
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n)))
    return tok, corpus


class Runner:
    def __init__(self, args, tok: Path, corpus: Path):
        self.args, self.tok, self.corpus = args, tok, corpus
        (args.out / "logs").mkdir(parents=True, exist_ok=True)

    def train(self, name: str, out_dir: Path, nproc: int, *overrides: str) -> list[dict]:
        """Run train.py; its metrics.jsonl records (all of them, earlier runs in the same out_dir too)."""
        compile_ = self.args.compile if self.args.compile is not None else torch.cuda.is_available()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.yaml"), "preset=tiny",
               f"tokenizer={self.tok}", f"data.paths=[{self.corpus}]", f"data.cache_dir={self.args.out / 'tokens'}",
               "seq_len=512", f"steps={self.args.steps}", "lr=0.001", "warmup_steps=2", "save_every=0",
               "keep_checkpoints=5",
               f"compile={str(compile_).lower()}", f"out_dir={out_dir}", *overrides]
        log = self.args.out / "logs" / f"{name}.log"
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n\n")
            f.flush()
            done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=self.args.timeout)
        if done.returncode:
            lines = log.read_text().splitlines()
            said = [line for line in lines if line.startswith("error: ") or "Error" in line.split(":")[0]]
            raise RuntimeError(f"{name} failed (exit {done.returncode}); see {log}:\n"
                               + "\n".join(said[-5:] or lines[-15:]))
        return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(records) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def compare(name: str, got: dict, want: dict, rel: float | None, notes: str = "") -> bool:
    """PASS if the same steps have losses within `rel` (None: identical floats); prints one line."""
    steps = sorted(want)
    if sorted(got) != steps:
        print(f"FAIL {name}: steps {sorted(got)} instead of {steps} {notes}", flush=True)
        return False
    diff = max(abs(got[s] - want[s]) for s in steps)
    relative = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    ok = diff == 0 if rel is None else relative <= rel
    bound = "bit for bit" if rel is None else f"tolerance {rel:g} relative"
    print(f"{'PASS' if ok else 'FAIL'} {name}: max |loss difference| {diff:.3g} (relative {relative:.3g}) over "
          f"steps {steps[0]}-{steps[-1]}, {bound}{notes}", flush=True)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="working directory (default: a new temporary one)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--jobs", type=int, help="runs at a time (default: 8 with GPUs, 1 on CPUs)")
    p.add_argument("--only", help="comma-separated checks (default: all)")
    p.add_argument("--compile", type=lambda s: s == "true", help="true/false (default: true on GPUs)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per train.py run")
    args = p.parse_args(argv)
    args.out = (args.out or Path(tempfile.mkdtemp(prefix="gpu_multi_"))).resolve()
    if args.out.exists() and any(args.out.glob("runs/*")):
        shutil.rmtree(args.out / "runs")
    half = args.steps // 2
    cp_checks = {f"cp_{lay}_{d}": (lay, d) for d in DTYPES for lay in LAYOUTS}
    checks = [*cp_checks, "dp_fp32", "resume", "reshard_dp", "reshard_cp"]
    chosen = args.only.split(",") if args.only else checks
    if set(chosen) - set(checks):
        sys.exit(f"unknown checks {sorted(set(chosen) - set(checks))}; choose from {', '.join(checks)}")
    jobs = args.jobs or (8 if torch.cuda.is_available() else 1)
    device = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available()
              else "CPU (gloo)")
    print(f"gpu_multi: {device}, torch {torch.__version__}, {args.steps} steps, out {args.out}", flush=True)
    runner = Runner(args, *setup(args.out))
    runs = args.out / "runs"

    def cp_args(check):
        lay, dtype = cp_checks[check]
        return ["baseline=full" if lay == "full" else f"sparse={lay}", f"dtype={DTYPES[dtype]}",
                *([f"save_every={half}"] if check == "cp_sink_window_fp32" else [])]  # resumed by later checks

    # Phase 1: the runs that depend on nothing.
    need_cp = {c for c in chosen if c in cp_checks}
    if {"resume", "reshard_cp"} & set(chosen):
        need_cp.add("cp_sink_window_fp32")
    tasks = {}
    for c in sorted(need_cp):
        tasks[f"{c}.two"] = (runs / c / "two", 2, [*cp_args(c), "cp_degree=2"])
        tasks[f"{c}.one"] = (runs / c / "one", 1, cp_args(c))
    if {"dp_fp32", "reshard_dp"} & set(chosen):
        tasks["dp_fp32.two"] = (runs / "dp_fp32" / "two", 2, ["batch_size=1", "grad_accum=2", f"save_every={half}"])
        tasks["dp_fp32.one"] = (runs / "dp_fp32" / "one", 1, ["batch_size=1", "grad_accum=4"])
    if "resume" in chosen:
        tasks["resume.first"] = (runs / "resume", 2, [*cp_args("cp_sink_window_fp32"), "cp_degree=2",
                                                      f"steps={half}"])
    results, failed = {}, []

    def go(batch):
        with ThreadPoolExecutor(jobs) as pool:
            futures = {name: pool.submit(runner.train, name, out, n, *over) for name, (out, n, over) in batch.items()}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except RuntimeError as e:
                failed.append(name)
                print(f"FAIL {name}: {e}", flush=True)

    go(tasks)
    # Phase 2 and 3: resumed runs.
    later = {}
    if "resume" in chosen and "resume.first" in results:
        later["resume.second"] = (runs / "resume", 2, [*cp_args("cp_sink_window_fp32"), "cp_degree=2", "--resume"])
    for check, source, one, two in (
            ("reshard_dp", "dp_fp32.two", ["batch_size=1", "grad_accum=4"], ["batch_size=1", "grad_accum=2"]),
            ("reshard_cp", "cp_sink_window_fp32.two", cp_args("cp_sink_window_fp32"),
             [*cp_args("cp_sink_window_fp32"), "cp_degree=2"])):
        if check in chosen and source in results:
            (runs / check).mkdir(parents=True, exist_ok=True)
            shutil.copytree(tasks[source][0] / f"step_{half}", runs / check / f"step_{half}")
            later[f"{check}.one"] = (runs / check, 1, [*one, f"steps={half + half // 2}", "--resume"])
            later[f"{check}.two"] = (runs / check, 2, [*two, "--resume"])
    go({k: v for k, v in later.items() if k.endswith(".one") or k == "resume.second"})
    go({k: v for k, v in later.items() if k.endswith(".two") and k.startswith("reshard")
        and k.replace(".two", ".one") in results})

    ok = []
    for c in chosen:
        if c in cp_checks and {f"{c}.two", f"{c}.one"} <= set(results):
            two = results[f"{c}.two"]
            exchange = two[-1]["exchange"]
            sparse = {k: v for k, v in exchange.items() if k != "full"}
            fewer = all(v["rows_per_layer"] < v["allgather_rows_per_layer"] for v in sparse.values())
            notes = "; exchanged rows per layer: " + ", ".join(f"{k} {v['rows_per_layer']} of "
                                                                f"{v['allgather_rows_per_layer']}"
                                                                for k, v in sorted(exchange.items()))
            passed = compare(c, losses(two), losses(results[f"{c}.one"]), TOLERANCE[cp_checks[c][1]], notes)
            if not fewer:
                print(f"FAIL {c}: the sparse layers exchanged as many rows as an all-gather", flush=True)
            ok.append(passed and fewer and two[0]["world_size"] == 2)
        elif c == "dp_fp32" and {"dp_fp32.two", "dp_fp32.one"} <= set(results):
            ok.append(compare(c, losses(results["dp_fp32.two"]), losses(results["dp_fp32.one"]), TOLERANCE["fp32"]))
        elif c == "resume" and "resume.second" in results and "cp_sink_window_fp32.two" in results:
            setups = [r["resumed_at"] for r in results["resume.second"] if r.get("event") == "setup"]
            ok.append(compare(c, losses(results["resume.second"]), losses(results["cp_sink_window_fp32.two"]), None,
                              f"; resumed at {setups[-1]}") and setups == [0, half])
        elif c.startswith("reshard") and f"{c}.two" in results:
            whole = losses(results["dp_fp32.two" if c == "reshard_dp" else "cp_sink_window_fp32.two"])
            records = results[f"{c}.two"]
            worlds = [(r["world_size"], r["resumed_at"]) for r in records if r.get("event") == "setup"]
            ok.append(compare(c, losses(records), {s: whole[s] for s in whole if s > half}, TOLERANCE["fp32"],
                              f"; (processes, resumed at): {worlds}") and worlds == [(1, half), (2, half + half // 2)])
        else:
            print(f"FAIL {c}: a run it needs failed", flush=True)
            ok.append(False)
    print(f"gpu_multi: {sum(ok)} of {len(ok)} checks passed", flush=True)
    return 0 if all(ok) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
