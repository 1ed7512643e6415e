"""Long-context evaluation, offline: passkey retrieval, needle-in-a-haystack, RULER's synthetic tasks, BABILong, and
perplexity by position, for any checkpoint the loader reads, natively or with a post-hoc KV-cache reduction.

    python eval.py --tasks passkey,niah,ruler,babilong --lengths 2k,4k,8k [--checkpoint PATH] [--samples 5]
                   [--depths 10] [--kv-policy none|streaming|h2o|snapkv --kv-budget N] [--ppl-data DIR] [--out DIR]

Greedy decoding everywhere. Writes results.json (every sample), results.md (mean score x 100 per task and length,
with RULER's effective length) and a depth x length heatmap per retrieval task. Every substitution for data that
cannot be had offline is listed in the report (shared/docs/EVALS.md).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

import generate as gen
import kv_policies
import longgen
from config import parse_length
from errors import UserError, run_cli
from eval_tasks import Task, tasks_for

RULER_THRESHOLD = 85.6  # RULER's effective length: the longest length whose mean score stays above this


def answer(model, tok, prompts: list[list[int]], max_new_tokens: int, policy: str, budget: int) -> list[str]:
    """Greedy answers to a batch of prompts (one at a time for the scored KV policies)."""
    if policy in ("h2o", "snapkv"):
        outs = [kv_policies.generate(model, p, max_new_tokens, policy, budget, stop_ids=tok.stop_ids) for p in prompts]
    else:
        outs = [[] for _ in prompts]
        for step in gen.generate(model, prompts, max_new_tokens, stop_ids=tok.stop_ids):
            for row, token in enumerate(step.tolist()):
                if not (outs[row] and outs[row][-1] in tok.stop_ids):
                    outs[row].append(token)
    return [tok.decode([t for t in ids if t not in tok.stop_ids]) for ids in outs]


def run_task(model, tok, task: Task, length: int, args, depths) -> list[dict]:
    samples = [task.sample(length, i, args.seed, tok, depth=d) for d in depths for i in range(args.samples)]
    records = []
    for a in range(0, len(samples), args.batch):
        batch = samples[a:a + args.batch]
        prompts = [tok.encode(s.prompt) for s in batch]
        if max(map(len, prompts)) + max(s.max_new_tokens for s in batch) > model.cfg.max_seq_len:
            raise UserError(f"{task.name} at {length} tokens does not fit the model's context of "
                            f"{model.cfg.max_seq_len}; drop that length.")
        predictions = answer(model, tok, prompts, max(s.max_new_tokens for s in batch), args.kv_policy, args.kv_budget)
        for s, prompt, prediction in zip(batch, prompts, predictions):
            records.append({**s.meta, "task": task.name, "length": length, "prompt_tokens": len(prompt),
                            "answers": s.answers, "prediction": prediction, "score": task.score(prediction, s)})
    return records


@torch.no_grad()
def perplexity(model, tok, paths: list[str], length: int, n_buckets: int = 8, n_docs: int = 8) -> list[float]:
    """Mean loss per position bucket over the first `length` tokens of held-out documents at least that long: the
    loss should keep falling with position if the model uses its long context."""
    from data import DataConfig, load_documents

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


def report(results: list[dict], lengths: list[int], header: dict, ppl: dict, substitutions: dict) -> str:
    by = defaultdict(list)
    for r in results:
        by[r["task"], r["length"]].append(r["score"])
    tasks = list(dict.fromkeys(r["task"] for r in results))
    mean = {key: 100 * sum(v) / len(v) for key, v in by.items()}
    lines = [f"# Evaluation: {header['checkpoint']}", "",
             f"Layout: {header['layout']}. KV policy: {header['kv_policy']}"
             + (f" at {header['kv_budget']} tokens per layer and head." if header["kv_policy"] != "none" else "."),
             f"Samples per task and length: {header['samples']}; seed {header['seed']}; greedy decoding.", "",
             "| task | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths) + " | mean |",
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


def heatmap(results: list[dict], task: str, path: Path) -> None:
    """Mean score by depth (rows) and length (columns), as in gkamradt's needle-in-a-haystack plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = defaultdict(list)
    for r in results:
        if r["task"] == task and r.get("depth") is not None:
            cells[round(r["depth"], 3), r["length"]].append(r["score"])
    if not cells:
        return
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--tasks", default="passkey,niah,ruler,babilong",
                   help="comma-separated: passkey, niah, ruler (all RULER tasks) or ruler/NAME, babilong or "
                        "babilong/qaN")
    p.add_argument("--lengths", default="2k,4k,8k", help="context lengths in tokens, e.g. 2k,4k,8k")
    p.add_argument("--samples", type=int, default=5, help="samples per task and length (and depth)")
    p.add_argument("--depths", type=int, default=5, help="needle depths for passkey and niah (an even grid)")
    p.add_argument("--kv-policy", choices=kv_policies.POLICIES, default="none",
                   help="post-hoc KV reduction, applied to a full-attention model")
    p.add_argument("--kv-budget", type=int, help="tokens kept per layer and head (default: the sink + window of "
                                                 "the LongGen pattern, 2,112)")
    p.add_argument("--layout", choices=("checkpoint", "full", "longgen"), default="checkpoint")
    p.add_argument("--sparse", choices=longgen.SPARSE_KINDS, default="sink_window")
    p.add_argument("--ppl-data", nargs="*", default=[], help="documents for perplexity by position (files/dirs)")
    p.add_argument("--batch", type=int, default=4, help="prompts decoded together (policy none or streaming)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=gen.DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    tasks = tasks_for(args.tasks)
    if min(args.samples, args.depths, args.batch) < 1:
        raise UserError("--samples, --depths and --batch must be at least 1.")
    dtype = gen.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                       else torch.float32)
    model, tok = longgen.load(args.checkpoint, device=args.device, dtype=dtype)
    if args.layout == "full":
        longgen.full_attention(model)
    elif args.layout == "longgen":
        longgen.convert(model, sparse=args.sparse)
    args.kv_budget = args.kv_budget or model.cfg.n_sink + model.cfg.window
    if args.kv_policy != "none":
        if set(model.cfg.attn) != {"full"}:
            raise UserError("KV policies are applied to full-attention models; add --layout full.")
        if args.kv_policy == "streaming":
            model.cfg = kv_policies.streaming_config(model.cfg, args.kv_budget)
    grid = [(d + 0.5) / args.depths for d in range(args.depths)]
    results = []
    from tqdm import tqdm

    with tqdm(total=len(tasks) * len(lengths), desc="evaluating", unit="task") as bar:
        for task in tasks:
            for length in lengths:
                bar.set_postfix(task=task.name, length=length)
                results += run_task(model, tok, task, length, args, grid if task.takes_depth else [None])
                bar.update(1)
    ppl = {n: perplexity(model, tok, args.ppl_data, n) for n in lengths} if args.ppl_data else {}
    header = dict(checkpoint=str(args.checkpoint or "SmolLM2-135M-Instruct (default)"),
                  layout=", ".join(f"{model.cfg.attn.count(k)} {k}" for k in dict.fromkeys(model.cfg.attn)),
                  kv_policy=args.kv_policy, kv_budget=args.kv_budget, samples=args.samples, seed=args.seed,
                  lengths=lengths)
    args.out.mkdir(parents=True, exist_ok=True)
    substitutions = {t.name: list(t.substitutions) for t in tasks}
    (args.out / "results.json").write_text(json.dumps(dict(header=header, substitutions=substitutions,
                                                           perplexity=ppl, results=results), indent=1))
    text = report(results, lengths, header, ppl, substitutions)
    (args.out / "results.md").write_text(text)
    for task in ("passkey", "niah"):
        heatmap(results, task, args.out / f"{task}_heatmap.png")
    print(text)
    print(f"Written to {args.out}/ (results.json, results.md, heatmaps).", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
