"""LongGen against full attention, side by side in one process, at Llama-2-7B shapes (random weights: speed does not
depend on their values).

    python bench.py [--lengths 4096,32768] [--layers 32] [--variant sink_window,strided] [--batch 1]
                    [--json out.json]

For each layout (all layers full, then LongGen with each sparse variant) and context length it measures the KV cache
bytes actually allocated, the chunked prefill time (as generate.py runs it), and decode ms/token with the compiled
CUDA-graph step, against the memory-bandwidth roofline: (weight bytes + KV bytes read per token) / measured copy
bandwidth. The ceilings (copy bandwidth, bf16 matmul rate) are measured in the same run. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import longgen
from cache import Cache
from generate import compiled_decode, prefill
from model import build, preset


def ceilings() -> dict:
    from triton.testing import do_bench

    src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return dict(copy_GBps=2 * src.nbytes / copy_ms / 1e6, matmul_TFLOPs=2 * 8192**3 / mm_ms / 1e9)


def random_model(cfg):
    """The model with random bf16 weights made on the GPU (no 13 GB host copy)."""
    return build(cfg, device="cuda", dtype=torch.bfloat16).eval()


def decode_ms(model, cache, token, steps: int) -> tuple[float, float]:
    """(compile seconds, median ms per token over `steps` greedy steps on the device, no host syncs)."""
    decode = compiled_decode("cuda")
    t = time.perf_counter()
    for _ in range(3):  # compile, record the CUDA graph, replay
        token = decode(model, cache, token).argmax(-1)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for _ in range(steps):
            token = decode(model, cache, token).argmax(-1)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return compile_s, sorted(times)[1]


def measure(model, length: int, batch: int, new_tokens: int, chunk: int, copy_GBps: float) -> dict:
    cfg = model.cfg
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    cache = Cache(cfg, batch, length + new_tokens, "cuda", torch.bfloat16)
    kv_bytes = torch.cuda.memory_allocated() - before
    cache.mark_static()
    prompts = torch.randint(0, cfg.vocab_size, (batch, length)).tolist()
    with torch.inference_mode():
        prefill(model, cache, prompts, chunk)  # warm-up: compiles flex for these shapes
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = prefill(model, cache, prompts, chunk)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t
        compile_s, ms = decode_ms(model, cache, logits.argmax(-1), new_tokens // 4)
    weights = sum(p.nbytes for p in model.parameters())
    if not cfg.tie_embeddings:
        weights -= model.tok_embeddings.weight.nbytes  # the embedding table is looked up (one row), not read whole
    read = weights + sum(cache.nbytes().values())  # every slot of every layer is read each step
    roofline_ms = read / copy_GBps / 1e6
    return dict(kv_bytes=kv_bytes, kv_full_bytes=cache.full_attention_nbytes(), prefill_s=prefill_s,
                decode_ms=ms, decode_compile_s=compile_s, roofline_ms=roofline_ms, roofline_frac=roofline_ms / ms)


def profile_decode(model, length: int, batch: int, new_tokens: int, chunk: int) -> None:
    cache = Cache(model.cfg, batch, length + new_tokens, "cuda", torch.bfloat16)
    cache.mark_static()
    with torch.inference_mode():
        token = prefill(model, cache, torch.randint(0, 1000, (batch, length)).tolist(), chunk).argmax(-1)
        decode = compiled_decode("cuda")
        for _ in range(3):
            token = decode(model, cache, token).argmax(-1)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                token = decode(model, cache, token).argmax(-1)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,32768", help="context lengths (prompt tokens)")
    p.add_argument("--layers", type=int, default=32, help="model depth (Llama-2-7B has 32)")
    p.add_argument("--variant", default="sink_window,strided", help="LongGen sparse variants to compare")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps to reserve and time")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk, as generate.py --chunk")
    p.add_argument("--json", help="write all numbers here")
    p.add_argument("--profile", action="store_true", help="instead: profile 20 decode steps of the first layout and "
                                                         "length, and print the top kernels")
    args = p.parse_args()
    torch._dynamo.config.recompile_limit = 64  # one decode compile per (layout, length), all measured
    lengths = [int(n) for n in args.lengths.split(",")]
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, batch=args.batch, rows=[],
                  **ceilings())
    print(f"ceilings: copy {report['copy_GBps']:.0f} GB/s, bf16 matmul {report['matmul_TFLOPs']:.0f} TFLOP/s",
          flush=True)
    base = preset("llama-2-7b", n_layers=args.layers, max_seq_len=max(lengths) + args.new_tokens)
    model = random_model(base)
    if args.profile:
        return profile_decode(model, lengths[0], args.batch, args.new_tokens, args.chunk)
    layouts = {"full": base, **{f"longgen {v}": longgen.convert(base, sparse=v) for v in args.variant.split(",")}}
    for length in lengths:
        for name, cfg in layouts.items():
            model.cfg = cfg
            row = dict(layout=name, length=length, full_layers=cfg.attn.count("full"), **measure(
                model, length, args.batch, args.new_tokens, args.chunk, report["copy_GBps"]))
            report["rows"].append(row)
            print(row, flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
    print(f"\n{report['device']}, torch {report['torch']}, Llama-2-7B shapes, {args.layers} layers, batch "
          f"{args.batch}, bf16; copy {report['copy_GBps']:.0f} GB/s")
    print(f"{'context':>8} {'layout':<20} {'KV GiB':>7} {'vs full':>8} {'prefill s':>10} {'x':>5} {'decode ms':>10} "
          f"{'x':>5} {'roofline':>9}")
    for row in report["rows"]:
        ref = next(r for r in report["rows"] if r["length"] == row["length"] and r["layout"] == "full")
        print(f"{row['length']:>8} {row['layout']:<20} {row['kv_bytes'] / 2**30:>7.2f} "
              f"{row['kv_bytes'] / ref['kv_bytes'] - 1:>+8.0%} {row['prefill_s']:>10.3f} "
              f"{ref['prefill_s'] / row['prefill_s']:>5.2f} {row['decode_ms']:>10.2f} "
              f"{ref['decode_ms'] / row['decode_ms']:>5.2f} {row['roofline_frac']:>9.0%}")


if __name__ == "__main__":
    main()
