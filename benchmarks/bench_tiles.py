"""Sweep the decoding kernels' tiles on this GPU, and write the winners into decoding/tiles.json: the table
decoding/kernels.py reads at run time, one entry per GPU model (kernels.device_key: its name and compute capability).

    python -m benchmarks.bench_tiles [--preset llama-2-7b] [--parts gemv,rope] [--budget-s 60] [--out tiles.json]
                          [--json sweep.json]

- gemv: each matrix-vector product of a batch-1 decoding step (wqkv, wo, w13, w2, output) with the prologue and
  residual it runs with, for every candidate tiling (rows per program, K step, warps, stages);
- rope: norm_qkv_rope (RMSNorm, wqkv, RoPE, cache write) at the preset's shape.
Products are timed as CUDA-graph replays with the weights rotating through copies of 4x the L2 cache, so each is read
from memory. Every part measures today's tiles (the fallback: this GPU's entry in the table, else the rules in
decoding/kernels.py) first; a candidate replaces them only if it is at least 1% faster, so noise cannot pick a worse
one. Each part stops trying candidates after --budget-s seconds and keeps the best so far. The entry is merged into
--out atomically (other GPUs' entries and this GPU's unswept parts kept). Needs a CUDA GPU with Triton.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
from pathlib import Path

import torch

from decoding import kernels
from bench import elapsed_ms, measure_copy_GBps
from errors import UserError, run_cli, write_atomic

PARTS = ("gemv", "rope")
GEMV_CANDIDATES = [(rows, bk, warps, stages) for rows in (2, 1, 4, 8) for bk, warps in
                   ((1024, 4), (2048, 8), (512, 4), (1024, 8)) for stages in (3, 1)]
ROPE_CANDIDATES = [(16, 256, 4, 4), (8, 256, 2, 6), (16, 128, 8, 4)] + [  # the first three: an H200's best in 2026-12
    (pairs, bk, warps, stages) for pairs in (1, 2, 4) for bk, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 8))
    for stages in (1, 3)]


# ------------------------------------------------------------------------------------------------ the table
def write_entry(path: Path, key: str, entry: dict) -> dict:
    """Merge this GPU's entry into the table at `path` (parts not swept now keep their old values), written atomically
    (errors.write_atomic). Returns the whole table."""
    path = Path(path)
    table = json.loads(path.read_text()) if path.exists() else {}
    table[key] = {**table.get(key, {}), **entry}
    write_atomic(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def pick(results: list[dict], margin: float):
    """The fastest candidate, or the first (the fallback) unless the fastest beats it by `margin`."""
    ok = [r for r in results if "us" in r]
    best = min(ok, key=lambda r: r["us"])
    return best if best["us"] < ok[0]["us"] * (1 - margin) else ok[0]


# ------------------------------------------------------------------------------------------------ timing
def graph_us(fn, repeats: int = 5) -> float:
    """Median us of fn replayed as one CUDA graph (after two warm-up calls, where Triton compiles)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(), fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return statistics.median(elapsed_ms(graph.replay, "cuda") for _ in range(repeats)) * 1e3


def copies(N: int, K: int) -> int:
    """How many copies of an N x K bf16 matrix fill 4x the L2 cache."""
    return max(1, math.ceil(4 * torch.cuda.get_device_properties(0).L2_cache_size / (N * K * 2)))


def sweep(name: str, candidates, fallback, run, budget_s: float, log) -> list[dict]:
    """Time `run(tiles)` for the fallback, then each candidate until the budget is spent; failures are recorded."""
    results, deadline = [], time.monotonic() + budget_s
    for tiles in [fallback, *[c for c in candidates if c != fallback]]:
        if results and time.monotonic() > deadline:
            break
        try:
            row = dict(tiles=tiles, us=run(tiles))
        except Exception as e:  # a tiling this Triton cannot compile: recorded, not fatal
            row = dict(tiles=tiles, error=f"{type(e).__name__}: {str(e)[:200]}")
        results.append(row)
        log(f"{name} {row}")
    return results


# ------------------------------------------------------------------------------------------------ the parts
def sweep_gemv(cfg, budget_s: float, copy_GBps: float, log) -> tuple[dict, list]:
    dev, dt = "cuda", torch.bfloat16
    D, E = cfg.dim, cfg.head_dim
    shapes = {"wqkv": (kernels.RMSNORM, False, (cfg.n_heads + 2 * cfg.n_kv_heads) * E, D),
              "wo": (kernels.NONE, True, D, cfg.n_heads * E),
              "w13": (kernels.RMSNORM, False, 2 * cfg.ffn_dim, D),
              "w2": (kernels.SWIGLU, True, D, cfg.ffn_dim),
              "output": (kernels.RMSNORM, False, cfg.vocab_size, D)}
    table, rows = {}, []
    for name, (prologue, residual, N, K) in shapes.items():
        weights = [torch.randn(N, K, device=dev, dtype=dt) / K**0.5 for _ in range(copies(N, K))]
        x = torch.randn(1, 1, 2 * K if prologue == kernels.SWIGLU else K, device=dev, dtype=dt)
        norm, res = torch.randn(K, device=dev, dtype=dt), torch.randn(1, 1, N, device=dev, dtype=dt)

        def run(tiles):
            return graph_us(lambda: [kernels.launch_gemv(x, w, norm, res, 1e-5, prologue, residual, tiles)
                                     for w in weights]) / len(weights)

        today = kernels.gemv_tiles(N, K, kernels.device_key(dev))
        results = sweep(f"gemv {name} {N}x{K}", GEMV_CANDIDATES, today, run, budget_s / len(shapes), log)
        for r in results:
            r.update(product=name, N=N, K=K)
            if "us" in r:
                r["of_copy"] = N * K * 2 / r["us"] / 1e3 / copy_GBps
        table[f"{N}x{K}"] = list(pick(results, 0.01)["tiles"])
        rows += results
        del weights
    return table, rows


def sweep_rope(cfg, budget_s: float, copy_GBps: float, log) -> tuple[dict, list]:
    dev, dt = "cuda", torch.bfloat16
    H, G, E, K, C = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, 4224
    N = (H + 2 * G) * E
    weights = [torch.randn(N, K, device=dev, dtype=dt) / K**0.5 for _ in range(copies(N, K))]
    x, norm = torch.randn(1, 1, K, device=dev, dtype=dt), torch.randn(K, device=dev, dtype=dt)
    cos, sin = (torch.randn(C, E, device=dev, dtype=dt) for _ in range(2))
    pos, slots = torch.tensor([7], device=dev, dtype=torch.int32), torch.arange(C, device=dev, dtype=torch.int32)
    k_cache, v_cache = (torch.zeros(1, G, C, E, device=dev, dtype=dt) for _ in range(2))

    def run(tiles):
        return graph_us(lambda: [kernels.launch_norm_qkv_rope(x, w, norm, 1e-5, cos, sin, pos, k_cache, v_cache, slots,
                                                              H, tiles) for w in weights]) / len(weights)

    today = kernels.rope_tiles(E, K, kernels.device_key(dev))
    results = sweep(f"rope {E}x{K}", ROPE_CANDIDATES, today, run, budget_s, log)
    for r in results:
        r.update(N=N, K=K, **({"of_copy": N * K * 2 / r["us"] / 1e3 / copy_GBps} if "us" in r else {}))
    return {f"{E}x{K}": list(pick(results, 0.01)["tiles"])}, results


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-2-7b", help="model shapes (model.py presets; default llama-2-7b)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"what to sweep, any of: {', '.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="seconds of candidates per part, shared by its shapes (default 60)")
    p.add_argument("--out", default=str(kernels.TILES_PATH), help="the table to update (default: tiles.json here)")
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args(argv)
    args.parts = args.parts.split(",")
    if set(args.parts) - set(PARTS):
        raise UserError(f"Unknown parts {sorted(set(args.parts) - set(PARTS))}; choose from: {', '.join(PARTS)}.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available() or kernels.triton is None:
        raise UserError("bench_tiles.py sweeps GPU kernels: run it on a machine with a CUDA GPU and Triton.")
    from model import preset

    cfg, key = preset(args.preset), kernels.device_key("cuda")
    import triton

    rate = measure_copy_GBps("cuda")
    report = dict(device=key, torch=torch.__version__, triton=triton.__version__, preset=args.preset,
                  date=datetime.date.today().isoformat(), copy_GBps=rate)
    log = lambda line: print(line, flush=True)  # noqa: E731
    log(f"{key}: copy {rate:.0f} GB/s")
    entry = {}
    with torch.inference_mode():
        if "gemv" in args.parts:
            entry["gemv"], report["gemv"] = sweep_gemv(cfg, args.budget_s, rate, log)
        if "rope" in args.parts:
            entry["norm_qkv_rope"], report["rope"] = sweep_rope(cfg, args.budget_s, rate, log)
    entry["measured"] = dict(date=report["date"], torch=torch.__version__, triton=triton.__version__,
                             command="python -m benchmarks.bench_tiles --parts " + ",".join(args.parts))
    write_entry(Path(args.out), key, entry)
    report["entry"] = entry
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=1))
    log(f"wrote {key}'s entry to {args.out}: {json.dumps(entry)}")


if __name__ == "__main__":
    run_cli(main)
