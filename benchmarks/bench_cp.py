"""Training steps on several GPUs, as train.py runs them: context parallelism (each sequence split over the ranks,
`cp_degree`) and data parallelism, against one GPU.

    torchrun --nproc_per_node=2 -m benchmarks.bench_cp --json cp.json [--parts cp,single,dp] [--lengths 128k,256k]
             [--layouts full,sink_window,strided] [--exchange pattern,allgather] [--budget-s 480]
    python -m benchmarks.bench_cp --table a.json b.json          # one table of several runs' rows

Parts (rows run one after another, each with a fresh model and freshly compiled blocks):
- cp: every sequence split over --cp ranks (default: all of them), at each of --lengths, for each layout (every layer
  full, or LongGen with sink_window or strided, 3 full layers of 8 as bench.py --parts train) and each exchange
  (training/context_parallel.py: `pattern` fetches only the keys each sparse kind reaches, `allgather` all of them; full
  layers all-gather either way, so the full layout is one row);
- single: the same layouts on one GPU (rank 0; the others wait) at --single-lengths, for cp = N against one GPU;
- dp: SmolLM2-135M's shapes (30 layers, LongGen --dp-layout) at --dp-length, on one GPU and then data parallel over
  every rank (each its own sequences): tokens/s, from the mean step (the ranks' windows differ, so their steps do;
  the one-GPU row trains on every rank's windows in turn), for each --dp-reshard.
A step is train.py's: the loss of one packed window per data-parallel rank with document masking, backward, gradient
clipping and the fused AdamW step, under FSDP2 (bf16 compute, fp32 master weights), activation checkpointing and
compiled blocks (flex for the masks). Per row: step time (the slowest rank, median of the timed steps after the
warm-up ones), tokens/s, peak memory per GPU, graphs compiled during the timed steps (0 unless shapes changed), and
per attention kind the K/V rows and bytes the CP ranks exchanged in the last step (`exchanged`:
context_parallel.exchange_report).

Documents (--docs): `corpus` packs the offline corpus's documents (their lengths: docs/corpus_doc_lengths.json) with
data.PackedStream and configs/llama2-7b-128k.yaml's upsampling, as train.py would, so at 128K a window holds 2-4
documents that cross chunk and rank boundaries; step i of every row at a length trains on window i, the same for
every row. `none`: no document masking. A number: log-normal document lengths of that median (the CPU tests).
--profile adds one profiled step per row: GPU time in NCCL, attention and matrix kernels, and the NCCL time that no
compute kernel overlaps. --budget-s: rows that would start after that many seconds are skipped (and say so); the
JSON is rewritten after every row, so a run cut short keeps what it measured. On CPUs (gloo) it runs too, at tiny
sizes (--preset tiny --dp-preset tiny), for the tests: numbers there mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

import longgen
import train
from bench import train_layout
from training.config import load_config, parse_length
from training.context_parallel import exchange_report
from training.data import PackedStream
from errors import UserError, run_cli, write_atomic
from model import build, compile_settings, preset

PARTS = ("cp", "single", "dp")
LAYOUTS = ("full", "sink_window", "strided")
ROOT = Path(__file__).resolve().parents[1]
DOC_LENGTHS = ROOT / "docs" / "corpus_doc_lengths.json"
RECIPE = ROOT / "configs" / "llama2-7b-128k.yaml"  # its upsampling of long documents


# ------------------------------------------------------------------------------------------------ the data
def windows(length: int, n: int, docs: str, vocab_size: int, rank: int = 0, world: int = 1) -> list[tuple]:
    """n windows of length + 1 tokens for data-parallel rank `rank` of `world` (rank 0 of 1: the same for every CP
    rank): (tokens, doc_ids or None) each, (1, length + 1), on the CPU. Tokens are random (speed does not depend on
    them), documents as --docs says."""
    generator = torch.Generator().manual_seed(length * world + rank)
    tokens = [torch.randint(0, vocab_size, (1, length + 1), generator=generator) for _ in range(n)]
    if docs == "none":
        return [(t, None) for t in tokens]
    if docs == "corpus":
        lengths = json.loads(DOC_LENGTHS.read_text())
        lengths.pop("about")
        recipe = load_config(train.TrainConfig, RECIPE).data
        stream = PackedStream({name: [np.zeros(k, np.uint32) for k in ks] for name, ks in lengths.items()}, length,
                              upsample_long=recipe.upsample_long, long_doc_tokens=recipe.long_doc_tokens,
                              prefix=[1], suffix=[2], rank=rank, world_size=world)
        return [(t, stream.next_batch(1)[1]) for t in tokens]
    median = int(docs)
    out = []
    for t in tokens:
        sizes = (median * torch.exp(torch.randn(length // median + 8, generator=generator))).long().clamp(min=1)
        ids = torch.repeat_interleave(torch.arange(len(sizes)), sizes)[:length + 1]
        ids = torch.cat([ids, ids.new_full((length + 1 - len(ids),), len(sizes))])  # if the draw falls short
        out.append((t, ids[None].int()))
    return out


def describe(doc_ids) -> dict:
    """The windows' documents: how many, the longest, and full attention's pairs against a causal mask's (the work
    document masking leaves to the full layers)."""
    if doc_ids is None:
        return dict(documents=1, longest=None, full_pairs_of_causal=1.0)
    sizes = torch.bincount(doc_ids[0, :-1].long()).double()
    n = doc_ids.shape[1] - 1
    return dict(documents=int((sizes > 0).sum()), longest=int(sizes.max()),
                full_pairs_of_causal=float((sizes * (sizes + 1)).sum() / (n * (n + 1))))


# ------------------------------------------------------------------------------------------------ one row
def measure(model_cfg, length: int, mesh: DeviceMesh, cp_group, exchange: str, data: list, args,
            reshard: bool = True) -> dict:
    """Train.py's step on the ranks of `mesh` (FSDP over them) with this rank's windows `data` (warm-up ones first):
    the timings, memory, exchange and profile of the row."""
    device, group = args.device, mesh.get_group()
    torch.compiler.reset()  # each row compiles its own blocks: rows are independent, and no recompile limit is hit
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cfg = train.TrainConfig(dtype=args.dtype, compile=args.compile, seq_len=length,  # what shard_model reads
                            reshard_after_forward=reshard)
    torch.manual_seed(0)
    model = build(model_cfg, device=device)
    n_params = sum(p.numel() for name, p in model.named_parameters() if name != "tok_embeddings.weight")
    model = train.shard_model(model, cfg, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
    element = 2 if args.dtype == "bfloat16" else 4

    def step(tokens, doc_ids):
        stats = {}
        masked = doc_ids is not None
        loss = train.lm_loss(model, tokens, doc_ids if masked else torch.zeros_like(tokens), masked, cp_group,
                             args.loss_chunk, exchange or "pattern", stats)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return stats

    times, graphs = [], 0
    for i, (tokens, doc_ids) in enumerate(data):
        tokens, doc_ids = tokens.to(device), None if doc_ids is None else doc_ids.to(device)
        if i == args.warmup:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        dist.barrier(group)
        t0 = time.perf_counter()
        stats = step(tokens, doc_ids)
        _sync(device)
        times.append(time.perf_counter() - t0)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    slowest = torch.tensor(times, dtype=torch.float64, device=_comm_device(group, device))
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0],
                        dtype=torch.float64, device=slowest.device)
    peaks = [torch.zeros_like(peak) for _ in range(dist.get_world_size(group))]
    dist.all_gather(peaks, peak, group=group)
    per_rank = [torch.zeros_like(slowest) for _ in range(dist.get_world_size(group))]
    dist.all_gather(per_rank, slowest, group=group)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    times = slowest.tolist()
    row = dict(step_s=statistics.median(times[args.warmup:]), mean_step_s=statistics.mean(times[args.warmup:]),
               steps_s=times, steps_s_per_rank=[t.tolist() for t in per_rank], compile_step_s=times[0],
               graphs_compiled_in_timed_steps=graphs, peak_gib=max(float(p) for p in peaks) / 2**30,
               peak_gib_per_rank=[float(p) / 2**30 for p in peaks],
               flops_per_step=mesh.size() // _size(cp_group) * train.step_flops(  # every window of the step
                   model_cfg, n_params, torch.zeros_like(tokens) if doc_ids is None else doc_ids, doc_ids is not None),
               exchanged=exchange_report(stats, element, cp_group) if cp_group is not None else {})
    if args.profile:
        try:
            row["profile"] = profile_step(step, data[-1], device, group)
        except Exception as e:  # a profile that fails must not cost the measurements
            row["profile"] = dict(error=f"{type(e).__name__}: {e}")
        profiles = [None] * dist.get_world_size(group)
        dist.all_gather_object(profiles, row["profile"], group=group)
        row["profile_per_rank"] = profiles
    del model, optimizer
    return row


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _comm_device(group, device):
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def profile_step(step, window, device, group) -> dict:
    """One more step under the profiler, on this rank: GPU milliseconds in NCCL, attention (flex, flash) and matrix
    kernels and the rest, the step's wall time, and the NCCL time during which no other kernel ran (exposed)."""
    if device.type != "cuda":
        return dict(error="the profile reads GPU kernels; there are none on a CPU")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    tokens, doc_ids = window[0].to(device), None if window[1] is None else window[1].to(device)
    dist.barrier(group)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step(tokens, doc_ids)
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    spans = {"nccl": [], "attention": [], "matmul": [], "other": []}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA or e.time_range.end <= e.time_range.start:
            continue
        name = e.name.lower()
        kind = ("nccl" if "nccl" in name else
                "attention" if any(k in name for k in ("flex", "flash", "fmha", "attention", "triton_tem")) else
                "matmul" if any(k in name for k in ("gemm", "nvjet", "cutlass", "sm90", "cublas")) else "other")
        spans[kind].append((e.time_range.start, e.time_range.end))
    compute = _union(spans["attention"] + spans["matmul"] + spans["other"])
    nccl = _union(spans["nccl"])
    exposed = sum(end - start for start, end in nccl) - _overlap(nccl, compute)
    return dict(wall_ms=wall * 1e3, **{f"{k}_ms": sum(e - s for s, e in v) / 1e3 for k, v in spans.items()},
                compute_busy_ms=sum(e - s for s, e in compute) / 1e3, nccl_exposed_ms=exposed / 1e3)


def _union(spans):
    out = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _overlap(a, b) -> float:
    """Total length of the intersection of two sorted lists of disjoint intervals."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


# ------------------------------------------------------------------------------------------------ the run
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"what to measure, any of: {', '.join(PARTS)}")
    p.add_argument("--preset", default="llama-2-7b", help="model shapes of the cp and single parts (model.py)")
    p.add_argument("--layers", type=int, default=8, help="their depth (LongGen: a third full, in the middle)")
    p.add_argument("--lengths", default="128k,256k", help="context lengths of the cp part, e.g. 128k,256k,512k")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="full, sink_window (LongGen), strided (LongGen)")
    p.add_argument("--exchange", default="pattern,allgather", help="the sparse layers' exchange: pattern, allgather")
    p.add_argument("--cp", type=int, help="ranks that split each sequence in the cp part (default: all)")
    p.add_argument("--single-lengths", default="128k", help="context lengths of the single part")
    p.add_argument("--dp-preset", default="smollm2-135m", help="model shapes of the dp part (all its layers)")
    p.add_argument("--dp-length", default="32k", help="context length of the dp part")
    p.add_argument("--dp-layout", default="sink_window", help="the dp part's layout: full, sink_window, strided")
    p.add_argument("--dp-reshard", default="true", help="the dp part's FSDP reshard_after_forward (train.py's): "
                                                          "true, false, or true,false for rows of each")
    p.add_argument("--docs", default="corpus", help="corpus (the offline corpus's documents, packed), none (no "
                                                     "document masking), or a median document length in tokens")
    p.add_argument("--warmup", type=int, default=1, help="steps before the timed ones (the first compiles)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row")
    p.add_argument("--loss-chunk", type=int, default=4096, help="as train.py's loss_chunk")
    p.add_argument("--budget-s", type=float, default=0, help="skip rows that would start after this many seconds "
                                                              "(0: no limit)")
    p.add_argument("--profile", action="store_true", help="one more, profiled, step per row (GPU only)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager blocks")
    p.add_argument("--json", help="write every number here (rewritten after each row)")
    p.add_argument("--table", nargs="+", metavar="JSON", help="instead: print one table of the rows of these reports "
                                                             "(e.g. two runs' JSON files)")
    args = p.parse_args(argv)
    if args.table:
        return args
    args.parts = args.parts.split(",")
    if set(args.parts) - set(PARTS):
        raise UserError(f"Unknown parts {sorted(set(args.parts) - set(PARTS))}; choose from: {', '.join(PARTS)}.")
    args.layouts, args.exchange = args.layouts.split(","), args.exchange.split(",")
    if set(args.layouts + [args.dp_layout]) - set(LAYOUTS):
        raise UserError(f"--layouts and --dp-layout take {', '.join(LAYOUTS)}.")
    if set(args.exchange) - {"pattern", "allgather"}:
        raise UserError("--exchange takes pattern, allgather or pattern,allgather.")
    args.lengths = [parse_length(t) for t in args.lengths.split(",")]
    args.single_lengths = [parse_length(t) for t in args.single_lengths.split(",")]
    args.dp_length = parse_length(args.dp_length)
    args.dp_reshard = args.dp_reshard.split(",")
    if set(args.dp_reshard) - {"true", "false"}:
        raise UserError("--dp-reshard takes true, false or true,false.")
    args.dp_reshard = [r == "true" for r in args.dp_reshard]
    if args.docs not in ("corpus", "none") and not args.docs.isdigit():
        raise UserError(f"--docs takes corpus, none or a median document length in tokens, not {args.docs!r}.")
    if args.warmup < 1 or args.steps < 1:
        raise UserError("--warmup and --steps must be at least 1 (the first step compiles).")
    return args


def run(args) -> dict:
    rank, world, device = train.init_distributed()
    try:
        return _run(args, rank, world, device)
    finally:
        dist.destroy_process_group()


def _run(args, rank, world, device) -> dict:
    args.device = device
    args.dtype = "bfloat16" if device.type == "cuda" else "float32"  # bf16 matmuls crawl on CPUs
    cp = args.cp or world
    if world == 1 and set(args.parts) - {"single"}:
        raise UserError("The cp and dp parts need several processes (torchrun --nproc_per_node=2 -m "
                        "benchmarks.bench_cp ...); one process runs --parts single.")
    if world % cp:
        raise UserError(f"--cp {cp} must divide the number of processes ({world}); change one.")
    for length in args.lengths:
        if length % (2 * cp):
            raise UserError(f"Length {length} must be a multiple of 2 * cp = {2 * cp}; change --lengths or --cp.")
    start = time.monotonic()
    mesh = init_device_mesh(device.type, (world,))
    grid = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    cp_group, dp_rank = grid.get_group("cp"), grid.get_local_rank("dp")
    solo_group = dist.new_group([0])  # one GPU: rank 0 alone (every rank takes part in making the group)
    solo = DeviceMesh.from_group(solo_group, device.type) if rank == 0 else None
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  gpus=world, torch=torch.__version__, preset=args.preset, layers=args.layers, docs=args.docs,
                  warmup=args.warmup, steps=args.steps, dtype=args.dtype, compile=args.compile, rows=[])

    def record(row):
        report["rows"].append(row)
        if rank == 0:
            print(row, flush=True)
            if args.json:
                write_atomic(args.json, json.dumps(report, indent=1))

    def over_budget() -> bool:
        late = torch.tensor([float(args.budget_s and time.monotonic() - start > args.budget_s)],
                            device=_comm_device(dist.group.WORLD, device))
        dist.broadcast(late, 0)  # rank 0's clock decides for everyone
        return bool(late.item())

    def row(part, model_cfg, length, layout, exchange, dp, cp_, group_mesh, cp_grp, data, reshard=True):
        head = dict(part=part, length=length, layout=layout, exchange=exchange, dp=dp, cp=cp_, **describe(data[0][1]))
        if part == "dp":
            head["reshard_after_forward"] = reshard
        if over_budget():
            return record(dict(head, skipped=f"past --budget-s {args.budget_s:g}"))
        alone = dp * cp_ == 1  # one GPU: rank 0 measures, the others wait for it
        if group_mesh is not None:
            result = dict(head, **measure(model_cfg, length, group_mesh, cp_grp, exchange, data, args, reshard))
            record(dict(result, tokens_per_s=dp * length / timed_step(result)))
        if alone:
            dist.barrier()

    n = args.warmup + args.steps
    longest = max(args.lengths + args.single_lengths)
    base = preset(args.preset, max_seq_len=longest)
    small = replace(base, n_layers=args.layers, layer_kinds=("full",) * args.layers)
    layouts = {lay: replace(small, layer_kinds=train_layout(base, None if lay == "full" else lay, args.layers))
               for lay in args.layouts}
    if "cp" in args.parts:
        for length in args.lengths:
            data = windows(length, n, args.docs, base.vocab_size, dp_rank, world // cp)
            for lay, cfg in layouts.items():
                for exchange in (["allgather"] if lay == "full" else args.exchange):
                    row("cp", cfg, length, lay, exchange, world // cp, cp, mesh, cp_group, data)
    if "single" in args.parts:
        for length in args.single_lengths:
            data = windows(length, n, args.docs, base.vocab_size)
            for lay, cfg in layouts.items():
                row("single", cfg, length, lay, None, 1, 1, solo, None, data)
    if "dp" in args.parts:
        dp_base = preset(args.dp_preset, max_seq_len=args.dp_length)
        cfg = dp_base if args.dp_layout == "full" else longgen.convert(dp_base, sparse=args.dp_layout)
        ranks = [windows(args.dp_length, n, args.docs, cfg.vocab_size, r, world) for r in range(world)]
        # one GPU trains on every rank's windows in turn (the same data as the data-parallel row)
        one_gpu = [w for i in range(n) for w in (ranks[r][i] for r in range(world))]
        one_gpu = one_gpu[:args.warmup] + one_gpu[world * args.warmup:world * n]
        for reshard in args.dp_reshard:
            row("dp", cfg, args.dp_length, args.dp_layout, None, 1, 1, solo, None, one_gpu, reshard)
            row("dp", cfg, args.dp_length, args.dp_layout, None, world, 1, mesh, None, ranks[rank], reshard)
    report["seconds"] = time.monotonic() - start
    if rank == 0 and args.json:
        write_atomic(args.json, json.dumps(report, indent=1))
    return report if rank == 0 else {}


def timed_step(row: dict) -> float:
    """A row's step time for its tokens/s: the median step, but for dp the mean (the ranks' windows differ, and so do
    their steps; a report written before dp rows had a mean gives the median)."""
    return row.get("mean_step_s", row["step_s"]) if row["part"] == "dp" else row["step_s"]


# ------------------------------------------------------------------------------------------------ the table
def table(report: dict) -> str:
    """The rows, with speed-ups computed from them: each layout's step against full attention's (same part, length
    and GPUs), pattern against all-gather, and tokens/s against one GPU's (same layout and length)."""
    rows = [r for r in report["rows"] if "skipped" not in r]

    def find(**match):
        return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)

    def faster(ref, r):
        return f"{ref['step_s'] / r['step_s']:.2f}x" if ref is not None and ref is not r else ""

    out = [f"{report['device']} x {report['gpus']}, torch {report['torch']}, {report['dtype']}, documents: "
           f"{report['docs']}; cp and single: {report['preset']} width, {report['layers']} layers; "
           f"median (dp: mean) of {report['steps']} steps after {report['warmup']}",
           "\n| part | context | layout | exchange | dp x cp | docs | step s | tokens/s | vs full | vs all-gather | "
           "vs 1 GPU | peak GiB/GPU | sparse rows/layer | of all-gather | sparse GB/step | full GB/step |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        length = f"{r['length'] // 1024}K" if r["length"] % 1024 == 0 else str(r["length"])
        part = r["part"] + (" (no reshard)" if r.get("reshard_after_forward") is False else "")
        head = (f"| {part} | {length} | {r['layout']} | {r['exchange'] or ''} | "
                f"{r['dp']} x {r['cp']} | {r['documents']} |")
        if "skipped" in r:
            out.append(f"{head} skipped: {r['skipped']} |||||||||")
            continue
        full = find(part=r["part"], length=r["length"], layout="full", dp=r["dp"], cp=r["cp"])
        gathered = find(part="cp", length=r["length"], layout=r["layout"], exchange="allgather") \
            if r["exchange"] == "pattern" else None
        one = None if r["dp"] * r["cp"] == 1 else \
            find(part="dp" if r["part"] == "dp" else "single", length=r["length"], layout=r["layout"], dp=1, cp=1,
                 reshard_after_forward=r.get("reshard_after_forward"))
        scaling = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one else ""
        sparse = next((v for k, v in sorted(r["exchanged"].items()) if k != "full"), None)
        cells = ["", "", "", ""]
        if sparse:
            cells[:3] = [str(sparse["rows_per_layer"]), f"{sparse['of_allgather']:.1%}",
                         f"{sparse['bytes_per_step'] / 1e9:.3f}"]
        if "full" in r["exchanged"]:
            cells[3] = f"{r['exchanged']['full']['bytes_per_step'] / 1e9:.3f}"
        out.append(f"{head} {timed_step(r):.3f} | {r['tokens_per_s']:,.0f} | {faster(full, r)} | "
                   f"{faster(gathered, r)} | {scaling} | {r['peak_gib']:.1f} | {' | '.join(cells)} |")
    return "\n".join(out)


def merged(paths) -> dict:
    """One report of the rows of several (the first one's settings), for one table."""
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise UserError(f"Cannot read the report {path} ({e}); give JSON files that bench_cp.py --json wrote.")
    return dict(reports[0], rows=[row for r in reports for row in r["rows"]])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        print(table(merged(args.table)))
        return
    compile_settings()
    report = run(args)
    if report:
        print("\n" + table(report), flush=True)


if __name__ == "__main__":
    run_cli(main)
