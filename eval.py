"""Long-context evaluation, offline: passkey retrieval, needle-in-a-haystack, RULER's synthetic tasks, BABILong, and
perplexity by position, for any checkpoint the loader reads, natively or with a post-hoc KV-cache reduction.

    python eval.py --tasks passkey,niah,ruler,babilong --lengths 2k,4k,8k [--checkpoint PATH] [--samples 5]
                   [--depths 5] [--kv-policy none|streaming|h2o|snapkv --kv-budget N [--compress-before-question]]
                   [--ppl-data DIR] [--out DIR]

Greedy decoding everywhere. Writes into --out: results.json (every sample, and the run: device, date, command, code
version, wall time, torch version), results.md (mean score x 100 per task and length, with RULER's effective length)
and a depth x length heatmap per retrieval task. EVALUATION.md defines the benchmarks; every substitution for data
that cannot be had offline is listed in the report.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import cli
from training.config import parse_length
from errors import UserError, run_cli, write_atomic

RULER_THRESHOLD = 85.6  # RULER's effective length: the longest length whose mean score stays above this
REPORT_FILES = ("results.json", "results.md", "passkey_heatmap.png", "niah_heatmap.png")


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="passkey,niah,ruler,babilong",
                   help="comma-separated: passkey, niah, ruler (all RULER tasks) or ruler/NAME, babilong or "
                        "babilong/qaN (default: all)")
    p.add_argument("--lengths", default="2k,4k,8k", help="context lengths in tokens, e.g. 2k,4k,8k (default), at "
                                                         "most the model's context")
    p.add_argument("--samples", type=int, default=5, help="samples per task and length (and depth) (default 5)")
    p.add_argument("--depths", type=int, default=5, help="needle depths for passkey and niah, an even grid "
                                                         "(default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    p.add_argument("--kv-policy", choices=cli.names("evaluation.kv_policies", "POLICIES"), default="none",
                   help="post-hoc KV reduction, applied to a full-attention model (default none)")
    p.add_argument("--kv-budget", type=int, help="with --kv-policy: tokens kept per layer and head (default: the "
                                                 "model's sink + window, 2,112 as LongGen's)")
    p.add_argument("--compress-before-question", action="store_true",
                   help="with --kv-policy h2o or snapkv: cut the cache to the budget after the context, before the "
                        "question is read (as when one cached document is asked several questions); by default the "
                        "whole prompt, question included, is seen first, and snapkv keeps what the question attends to")
    p.add_argument("--batch", type=int, help="prompts decoded together, with --kv-policy none or streaming "
                                             "(default 4); h2o and snapkv run one at a time")
    p.add_argument("--ppl-data", nargs="*", type=Path, default=[],
                   help="documents (files or directories) for perplexity by position, at each length")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="directory for the report (default runs/eval)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                   help="instead of evaluating: join the reports in these directories (runs of one model, each with "
                        "its own tasks or lengths) into one report in --out; the evaluation options are not used")
    cli.add_model_args(p)
    return p.parse_args(argv)


def check_args(args) -> list[int]:
    """Every check that needs neither torch nor the model, so that a mistake is reported before the evaluation
    starts instead of after it; returns the lengths."""
    if not [name for name in args.tasks.split(",") if name.strip()]:
        raise UserError(f"--tasks {args.tasks!r} names no task; give e.g. --tasks passkey,niah.")
    if not [x for x in args.lengths.split(",") if x.strip()]:
        raise UserError(f"--lengths {args.lengths!r} names no length; give e.g. --lengths 2k,4k.")
    lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
    if min(lengths) < 0:
        raise UserError(f"--lengths must be numbers of tokens of 0 or more (got {min(lengths)}).")
    if min(args.samples, args.depths) < 1 or (args.batch is not None and args.batch < 1):
        raise UserError("--samples, --depths and --batch must be at least 1.")
    cli.check_seed(args.seed)
    if args.kv_policy == "none" and args.kv_budget is not None:
        raise UserError("--kv-budget applies only with --kv-policy streaming, h2o or snapkv; add one or drop "
                        "--kv-budget.")
    if args.kv_budget is not None and args.kv_budget < 1:
        raise UserError(f"--kv-budget must be at least 1 token (got {args.kv_budget}).")
    if args.kv_policy in ("h2o", "snapkv") and args.batch is not None:
        raise UserError(f"--batch has no effect with --kv-policy {args.kv_policy}, which runs one prompt at a time; "
                        "drop --batch.")
    if args.compress_before_question and args.kv_policy not in ("h2o", "snapkv"):
        raise UserError(f"--compress-before-question applies to --kv-policy h2o or snapkv, which choose what to keep "
                        f"from the prompt (--kv-policy {args.kv_policy} does not); drop it or choose one of them.")
    if args.kv_policy != "none" and args.layout == "longgen":
        raise UserError("KV policies are applied to full-attention models; use --layout full instead of longgen.")
    for path in args.ppl_data:
        if not path.exists():
            raise UserError(f"--ppl-data {path} does not exist; check the path.")
    for d in args.merge or []:
        if not (d / "results.json").is_file():
            raise UserError(f"--merge {d} holds no results.json; give directories that eval.py wrote.")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; give a directory for the report.")
    existing = [name for name in REPORT_FILES if (args.out / name).exists()]
    if existing and not args.overwrite:
        raise UserError(f"--out {args.out} already holds a report ({existing[0]}); choose another --out or add "
                        "--overwrite to replace it.")
    cli.check_model_args(args)
    return lengths


if __name__ == "__main__":  # parsed before torch is imported: --help and a mistyped option answer at once
    run_cli(lambda: check_args(parse_args()))

import torch  # noqa: E402

import generate as gen  # noqa: E402
from decoding import kernels  # noqa: E402
from evaluation import kv_policies  # noqa: E402
from evaluation.tasks import Task, tasks_for  # noqa: E402
from model import compile_settings  # noqa: E402


# ------------------------------------------------------------------------------------------------ evaluation
def answer(model, tok, prompts: list[list[int]], max_new_tokens: int, policy: str, budget: int,
           questions_from: list[int | None]) -> list[str]:
    """Greedy answers to a batch of prompts (one at a time for the scored KV policies, each compressed before the
    token where its question starts, or after the whole prompt where that is None)."""
    if policy in ("h2o", "snapkv"):
        outs = [kv_policies.generate(model, p, max_new_tokens, policy, budget, stop_ids=tok.stop_ids, question_from=q)
                for p, q in zip(prompts, questions_from)]
        return [tok.decode([t for t in ids if t not in tok.stop_ids]) for ids in outs]
    return gen.complete(model, tok, prompts, max_new_tokens)


def question_from(tok, prompt: list[int], sample) -> int:
    """The first token of the sample's question in its tokenised prompt: where the tokens of the context alone stop
    agreeing with it (a token may straddle the join; it then counts as the question's)."""
    context = gen.encode_prompt(tok, sample.prompt[:sample.meta["question_at"]])
    n = 0
    while n < min(len(context), len(prompt)) and context[n] == prompt[n]:
        n += 1
    return max(n, 1)


def run_task(model, tok, task: Task, length: int, args, depths, bar=None) -> list[dict]:
    """Every sample of one task at one length; `bar` (tqdm) advances by each batch's samples."""
    samples = [task.sample(length, i, args.seed, tok, depth=d) for d in depths for i in range(args.samples)]
    records = []
    for a in range(0, len(samples), args.batch):
        batch = samples[a:a + args.batch]
        prompts = [gen.encode_prompt(tok, s.prompt) for s in batch]
        if max(map(len, prompts)) + max(s.max_new_tokens for s in batch) > model.cfg.max_seq_len:
            raise UserError(f"{task.name} at {length} tokens does not fit the model's context of "
                            f"{model.cfg.max_seq_len}; drop that length.")
        questions_from = [question_from(tok, p, s) if args.compress_before_question else None
                          for s, p in zip(batch, prompts)]
        predictions = answer(model, tok, prompts, max(s.max_new_tokens for s in batch), args.kv_policy, args.kv_budget,
                             questions_from)
        for s, prompt, prediction in zip(batch, prompts, predictions):
            records.append({**s.meta, "task": task.name, "length": length, "prompt_tokens": len(prompt),
                            "answers": s.answers, "prediction": prediction, "score": task.score(prediction, s)})
        if bar is not None:
            bar.update(len(batch))
    return records


@torch.no_grad()
def perplexity(model, tok, paths: list[str], length: int, n_buckets: int = 8, n_docs: int = 8) -> list[float]:
    """Mean loss per position bucket over the first `length` tokens of held-out documents at least that long: the
    loss should keep falling with position if the model uses its long context."""
    from training.data import DataConfig, load_documents

    docs = [d for ds in load_documents(DataConfig(paths=paths), tok).values() for d in ds if len(d) > length]
    if not docs:
        raise UserError(f"No document in {', '.join(paths)} has more than {length} tokens; give longer ones.")
    device = model.tok_embeddings.weight.device
    losses = torch.zeros(length, device=device)
    for doc in docs[:n_docs]:
        tokens = torch.tensor(doc[:length + 1].astype("int64"), device=device)[None]
        logits = model(tokens[:, :-1])[0].float()
        losses += torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none")
    per_bucket = (losses / min(len(docs), n_docs)).view(n_buckets, -1).mean(dim=-1)
    return per_bucket.tolist()


def length_name(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def report(results: list[dict], lengths: list[int], header: dict, ppl: dict, substitutions: dict) -> str:
    by = defaultdict(list)
    for r in results:
        by[r["task"], r["length"]].append(r["score"])
    tasks = list(dict.fromkeys(r["task"] for r in results))
    mean = {key: 100 * sum(v) / len(v) for key, v in by.items()}
    lines = [f"# Evaluation: {header['checkpoint']}", "",
             f"Layout: {header['layout']}. KV policy: {header['kv_policy']}"
             + (f" at {header['kv_budget']} tokens per layer and head" if header["kv_policy"] != "none" else "")
             + (", the cache cut after the context, before the question is read."
                if header.get("compress_before_question") else "."),
             f"Samples per task and length: {header['samples']}; seed {header['seed']}; greedy decoding.", ""]
    if "device" in header:  # the run's record, as EVALUATION.md gives it with every number
        merged = len(header.get("parts", [])) > 1  # eval.py --merge: the run of each part follows
        lines += [f"- Device: {header['device']}; torch {header['torch']}.",
                  f"- Date: {header['date']}; the " + ("parts took" if merged else "run took")
                  + f" {header['wall_s']:.0f} s" + (" in all." if merged else "."),
                  f"- Command: `{header['command']}`", f"- Code: {header['code']}."]
        if merged:
            lines += ["- Parts:"] + [f"  - `{p['command']}` ({p['date']}, {p['wall_s']:.0f} s)" for p in header["parts"]]
        lines.append("")
    lines += ["| task | " + " | ".join(map(length_name, lengths)) + " | mean |",
              "|---|" + "---|" * (len(lengths) + 1)]
    groups = {"ruler": [t for t in tasks if t.startswith("ruler/")],
              "babilong": [t for t in tasks if t.startswith("babilong/")]}
    rows = tasks + [f"{g} (mean)" for g, members in groups.items() if members]
    for row in rows:
        members = groups.get(row.split(" ")[0], []) if row.endswith("(mean)") else [row]
        cells = [sum(mean[t, n] for t in members) / len(members) for n in lengths]
        lines.append(f"| {row} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(cells) / len(cells):.1f} |")
    if groups["ruler"]:
        ruler = [sum(mean[t, n] for t in groups["ruler"]) / len(groups["ruler"]) for n in lengths]
        effective = max((n for n, m in zip(lengths, ruler) if m > RULER_THRESHOLD), default=None)
        lines += ["", f"RULER effective length (mean above {RULER_THRESHOLD}): "
                      f"{effective if effective else 'none of the lengths'}."]
    if ppl:
        lines += ["", "Perplexity by position (mean loss per eighth of the window, first to last):", ""]
        lines += [f"- {n} tokens: " + ", ".join(f"{x:.3f}" for x in v) for n, v in ppl.items()]
    subs = sorted({s for v in substitutions.values() for s in v})
    if subs:
        lines += ["", "Substitutions for what cannot be had offline:", ""] + [f"- {s}" for s in subs]
    return "\n".join(lines) + "\n"


def heatmap(results: list[dict], task: str, path: Path) -> bool:
    """Mean score by depth (rows) and length (columns), as in gkamradt's needle-in-a-haystack plots; False when the
    task was not run (nothing drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = defaultdict(list)
    for r in results:
        if r["task"] == task and r.get("depth") is not None:
            cells[round(r["depth"], 3), r["length"]].append(r["score"])
    if not cells:
        return False
    depths, lengths = sorted({d for d, _ in cells}), sorted({n for _, n in cells})
    grid = [[100 * sum(cells[d, n]) / len(cells[d, n]) if cells[d, n] else math.nan for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.45 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{task}: score")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------ the run's record
def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def code_version() -> str:
    """The git commit of this code (with "+ uncommitted changes" when the tree differs from it), else the installed
    package's version."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"git {commit}" + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib import metadata

    try:
        return f"longgen {metadata.version('longgen')}"
    except metadata.PackageNotFoundError:
        return "unknown (neither a git checkout nor an installed package)"


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    lengths = check_args(args)
    tasks = tasks_for(args.tasks)
    if args.kv_policy == "streaming" and args.kv_budget is not None and args.kv_budget <= kv_policies.N_SINK:
        raise UserError(f"--kv-budget must be more than StreamingLLM's {kv_policies.N_SINK} sink tokens "
                        f"(got {args.kv_budget}).")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create --out {args.out} ({e.strerror}); choose another directory.") from None
    if args.merge:
        text = write_report(args.out, merge_runs(args.merge, shlex.join(["python", "eval.py", *argv])))
        print(text)
        print(f"Written to {args.out}/ (results.json, results.md, heatmaps).", file=sys.stderr)
        return
    t0, started = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)
    compile_settings()
    model, tok = cli.load_model(args)
    kernels.use_fused_decoding(model)  # one sequence on a GPU (--batch 1): the fused Triton products
    if max(lengths) > model.cfg.max_seq_len:
        raise UserError(f"--lengths {max(lengths)} exceeds the model's context of {model.cfg.max_seq_len} tokens; "
                        f"give lengths up to {model.cfg.max_seq_len}.")
    args.kv_budget = args.kv_budget or model.cfg.pattern_params["n_sink"] + model.cfg.pattern_params["window"]
    args.batch = 1 if args.kv_policy in ("h2o", "snapkv") else (args.batch or 4)
    if args.kv_policy != "none":
        if set(model.cfg.layer_kinds) != {"full"}:
            raise UserError("KV policies are applied to full-attention models; add --layout full.")
        if args.kv_policy == "streaming":
            model.cfg = kv_policies.streaming_config(model.cfg, args.kv_budget)
    ppl = {n: perplexity(model, tok, [str(p) for p in args.ppl_data], n) for n in lengths} if args.ppl_data else {}
    grid = [(d + 0.5) / args.depths for d in range(args.depths)]
    results = []
    from tqdm import tqdm

    total = sum(args.samples * (args.depths if t.takes_depth else 1) for t in tasks) * len(lengths)
    with tqdm(total=total, desc="evaluating", unit="sample") as bar:
        for task in tasks:
            for length in lengths:
                bar.set_postfix(task=task.name, length=length)
                results += run_task(model, tok, task, length, args, grid if task.takes_depth else [None], bar)
    run = dict(device=device_name(args.device), torch=torch.__version__, date=started.isoformat(timespec="seconds"),
               command=shlex.join(["python", "eval.py", *argv]), code=code_version(),
               wall_s=round(time.perf_counter() - t0, 1))
    header = dict(checkpoint=str(args.checkpoint or "SmolLM2-135M-Instruct (default)"),
                  layout=", ".join(f"{model.cfg.layer_kinds.count(k)} {k}"
                                   for k in dict.fromkeys(model.cfg.layer_kinds)),
                  kv_policy=args.kv_policy, kv_budget=args.kv_budget,
                  compress_before_question=args.compress_before_question, samples=args.samples, seed=args.seed,
                  lengths=lengths, **run)
    substitutions = {t.name: list(t.substitutions) for t in tasks}
    print(write_report(args.out, dict(header=header, substitutions=substitutions, perplexity=ppl, results=results)))
    print(f"Written to {args.out}/ (results.json, results.md, heatmaps) in {run['wall_s']:.0f} s.", file=sys.stderr)


def write_report(out: Path, run: dict) -> str:
    """results.json, results.md and the heatmaps of one run (header, substitutions, perplexity, results) into out;
    returns the markdown."""
    write_atomic(out / "results.json", json.dumps(run, indent=1).encode())
    h = run["header"]
    text = report(run["results"], h["lengths"], h, {int(n): v for n, v in run["perplexity"].items()},
                  run["substitutions"])
    write_atomic(out / "results.md", text.encode())
    for task in ("passkey", "niah"):
        if not heatmap(run["results"], task, out / f"{task}_heatmap.png"):
            (out / f"{task}_heatmap.png").unlink(missing_ok=True)  # an earlier run's, replaced by --overwrite
    return text


def merge_runs(dirs: list[Path], command: str) -> dict:
    """One run made of the reports in dirs: runs of one model under one KV policy, each with its own tasks or
    lengths (as tools/extension.py splits them), together covering every task at every length once. The header
    keeps each part's own record under `parts`."""
    runs = []
    for d in dirs:
        try:
            run = json.loads((d / "results.json").read_text())
            if not all(k in run["header"] for k in ("lengths", "samples", "date", "wall_s", "kv_budget")) or any(
                    k not in x for x in run["results"] for k in ("task", "length", "score")):
                raise KeyError
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"--merge: {d}/results.json is not a report eval.py wrote (unreadable or incomplete); "
                            "give the directories of finished evaluations.") from None
        runs.append(run)
    heads = [r["header"] for r in runs]
    same = {}
    for key in ("checkpoint", "layout", "kv_policy", "compress_before_question", "seed"):
        values = list(dict.fromkeys(json.dumps(h.get(key, False if key == "compress_before_question" else None))
                                    for h in heads))  # reports older than the flag did not record it
        if len(values) > 1:
            raise UserError(f"--merge joins runs of one model and KV policy, but their {key} differs "
                            f"({' vs '.join(values)}); merge those runs separately.")
        same[key] = heads[0].get(key)
    cells = {}
    for d, r in zip(dirs, runs):
        for task in dict.fromkeys(x["task"] for x in r["results"]):
            for n in r["header"]["lengths"]:
                if (task, n) in cells:
                    raise UserError(f"--merge: {task} at {n} tokens is in both {cells[task, n]} and {d}; "
                                    "give each task and length once.")
                cells[task, n] = d
    tasks = list(dict.fromkeys(t for t, _ in cells))
    lengths = sorted({n for _, n in cells})
    missing = [(t, n) for t in tasks for n in lengths if (t, n) not in cells]
    if missing:
        raise UserError(f"--merge: no run has {missing[0][0]} at {missing[0][1]} tokens, so the report would have a "
                        "hole; add that run or merge runs of the same lengths.")
    parts = [p for h in heads for p in h.get("parts", [h])]

    def joined(key):
        return " / ".join(dict.fromkeys(str(h[key]) for h in heads if key in h))

    results = [x for r in runs for x in r["results"]]
    per_cell = defaultdict(int)  # (task, length, depth) -> samples
    for x in results:
        per_cell[x["task"], x["length"], x.get("depth")] += 1
    by_samples = defaultdict(set)  # samples -> task families
    for (task, _, _), n in per_cell.items():
        by_samples[n].add(task.split("/")[0])
    samples = (next(iter(by_samples)) if len(by_samples) == 1 else
               "; ".join(f"{n} ({', '.join(sorted(f))})" for n, f in sorted(by_samples.items())))
    budget = {n: p["kv_budget"] for p in parts for n in p["lengths"]}  # each run's own, also inside merged parts
    kv_budget = (next(iter(set(budget.values()))) if len(set(budget.values())) == 1 else
                 " / ".join(f"{budget[n]:,}" for n in lengths) + " (at " + " / ".join(map(length_name, lengths)) + ")")
    header = dict(same, kv_budget=kv_budget, samples=samples, lengths=lengths, device=joined("device"),
                  torch=joined("torch"), date=min(h["date"] for h in heads), command=command, code=joined("code"),
                  wall_s=round(sum(h["wall_s"] for h in heads), 1), parts=parts)
    perplexity = {k: v for r in runs for k, v in r["perplexity"].items()}
    substitutions = {k: v for r in runs for k, v in r["substitutions"].items()}
    return dict(header=header, substitutions=substitutions, perplexity=perplexity, results=results)


if __name__ == "__main__":
    run_cli(main)
