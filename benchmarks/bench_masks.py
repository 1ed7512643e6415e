"""Which FlexAttention tile (BlockMask block size) is fastest for each LongGen pattern, and how fast masks build.

    python -m benchmarks.bench_masks [--lengths 16384,65536,131072] [--tiles 128,64,128x64] [--json out.json]

One attention layer at Llama-2-7B shape (B=1, 32 heads, head dim 128, bf16) with the paper's patterns (sink 64 +
window 2048; blocks of 64, 16 local, every 64th), forward and forward + backward, medians of triton's do_bench, with
SDPA flash causal (what full layers run) measured in the same process as the baseline. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from errors import write_atomic
from masks import block_mask, make_pattern

PATTERNS = {"sink_window": make_pattern("sink_window", n_sink=64, window=2048),
            "strided": make_pattern("strided", block=64, local_blocks=16, stride=64)}


def kernel_options(tile: tuple[int, int]) -> dict | None:
    """The kernel's own tiles (forward BLOCK_M x BLOCK_N, backward M1/N1/M2/N2) must divide the mask's: below 128,
    pick ones that do."""
    if min(tile) >= 128:
        return None
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}


def strided_mask_variants(block, local_blocks, stride):
    """The same strided mask_mod with its parameters as int64 tensors, int32 tensors, or Python constants (which the
    compiler folds, e.g. into shifts, at the price of a recompile per value)."""
    def make(block, local, stride):
        def strided_mask(b, h, q, k):
            qb, kb = q // block, k // block
            return (k <= q) & ((qb - kb < local) | ((kb + 1) % stride == 0))
        return strided_mask
    as_t = lambda dtype: [torch.tensor(x, device="cuda", dtype=dtype) for x in (block, local_blocks, stride)]  # noqa
    return {"int64": make(*as_t(torch.int64)), "int32": make(*as_t(torch.int32)),
            "const": make(block, local_blocks, stride)}


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench(fn, q, k, v, backward: bool) -> float:
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(q, k, v), warmup=50, rep=300, return_mode="median")
    dout = torch.randn_like(q)
    return do_bench(lambda: fn(q, k, v).backward(dout), warmup=50, rep=300, grad_to_none=[q, k, v],
                    return_mode="median")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="16384,65536,131072")
    p.add_argument("--tiles", default="128,64,128x64", help="mask tiles: N for N x N, QxK for query x key")
    p.add_argument("--json", help="write all numbers here")
    p.add_argument("--mask-arithmetic", action="store_true",
                   help="also time the strided mask_mod with int64 / int32 / constant parameters")
    args = p.parse_args()
    torch._dynamo.config.recompile_limit = 64  # one compile per (pattern, tile, grad mode), all measured
    lengths = [int(n) for n in args.lengths.split(",")]
    tiles = [tuple(int(x) for x in t.split("x")) if "x" in t else (int(t), int(t)) for t in args.tiles.split(",")]
    H, E, dev, dt = 32, 128, "cuda", torch.bfloat16
    rows, compiled_for = [], {}
    for S in lengths:
        q, k, v = (torch.randn(1, H, S, E, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        rows.append(dict(seq=S, kernel="SDPA causal (flash)", tile="", build_ms=0.0, sparsity=50.0,
                         fwd_ms=bench(sdpa, q, k, v, False), fwd_bwd_ms=bench(sdpa, q, k, v, True)))
        for name, pattern in PATTERNS.items():
            for tile in tiles:
                bm = block_mask(pattern, S, S, block_size=tile, device=dev)
                build = median_ms(lambda: block_mask(pattern, S, S, block_size=tile, device=dev))
                if (name, tile) not in compiled_for:  # dynamic lengths: one compile serves every length
                    compiled_for[name, tile] = torch.compile(flex_attention, dynamic=True)
                compiled = compiled_for[name, tile]
                opts = kernel_options(tile)
                fn = lambda q, k, v: compiled(q, k, v, block_mask=bm, kernel_options=opts)  # noqa: E731
                row = dict(seq=S, kernel=f"flex {name}", tile=f"{tile[0]}x{tile[1]}", build_ms=build,
                           sparsity=bm.sparsity())
                for key, backward in (("fwd_ms", False), ("fwd_bwd_ms", True)):
                    try:
                        row[key] = bench(fn, q, k, v, backward)
                    except Exception as e:  # a tile the kernel cannot run is a result too
                        row[key], row["error"] = float("nan"), f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(row, flush=True)
                if args.json:  # as we go: a run stopped at its time limit still leaves its numbers
                    write_atomic(args.json, json.dumps(dict(device=torch.cuda.get_device_name(),
                                                            torch=torch.__version__, rows=rows)))
        if args.mask_arithmetic:
            for variant, mask_mod in strided_mask_variants(64, 16, 64).items():
                bm = block_mask(PATTERNS["strided"], S, S, block_size=128, device=dev)
                bm = type(bm).from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                             bm.full_kv_indices, bm.BLOCK_SIZE, mask_mod, bm.seq_lengths)
                compiled = compiled_for.setdefault(("strided", variant), torch.compile(flex_attention, dynamic=True))
                fn = lambda q, k, v: compiled(q, k, v, block_mask=bm)  # noqa: E731
                row = dict(seq=S, kernel=f"flex strided {variant}", tile="128x128", build_ms=0.0,
                           sparsity=bm.sparsity(), fwd_ms=bench(fn, q, k, v, False),
                           fwd_bwd_ms=bench(fn, q, k, v, True))
                rows.append(row)
                print(row, flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, B=1 H={H} E={E} bf16")
    print(f"{'seq':>7} {'kernel':<22} {'tile':>7} {'build ms':>9} {'sparsity':>9} {'fwd ms':>8} {'fwd+bwd ms':>11}")
    for r in rows:
        print(f"{r['seq']:>7} {r['kernel']:<22} {r['tile']:>7} {r['build_ms']:>9.2f} {r['sparsity']:>8.1f}% "
              f"{r['fwd_ms']:>8.2f} {r['fwd_bwd_ms']:>11.2f}")


if __name__ == "__main__":
    main()
