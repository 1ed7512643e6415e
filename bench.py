"""LongGen against full attention, side by side in one process, at Llama-2-7B shapes (random weights: speed does not
depend on their values).

    python bench.py [--lengths 16k,32k,64k,128k] [--batch 1,8] [--variant sink_window,strided]
                    [--parts inference,products,masks,train,hf] [--json out.json]

For each layout (every layer full, then LongGen with each sparse variant) it measures:
- inference, per context length and batch: the KV cache bytes actually allocated, the chunked prefill time (as
  generate.py runs it; median of 5 for short prompts), and decode ms/token with the compiled CUDA-graph step, against
  the memory-bandwidth roofline: (weight bytes + KV bytes read per token) / measured copy bandwidth;
- products: each matrix-vector product of a batch-1 decoding step, as cuBLAS alone, as the plain step (norm or
  activation, cuBLAS, residual) and as decoding/kernels.py's fused Triton kernel, in GB/s of weights read;
- masks: the time to build each sparse pattern's BlockMask at each length;
- train: one training step (forward + backward of the loss, activation checkpointing and per-block compile as
  train.py) of a reduced-depth model at full width (`--train-layers`, default 8: 3 full of 8 is LongGen's 12 of 32);
- hf: a peer, transformers' own Llama of the same shapes generating with its compiled static cache (full attention).
The ceilings (copy bandwidth, bf16 matmul rate) are measured in the same run; compile time is reported apart from the
timings. Rows that do not fit the device's memory are skipped and say so. On a CPU it runs too (`--preset tiny`), for
the tests: numbers there mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from decoding import kernels
import longgen
import train
from cache import Cache
from training.config import parse_length
from errors import UserError, run_cli, write_atomic
from generate import compiled_decode, decode_one, prefill
from masks import block_mask
from model import RMSNorm, build, compile_settings, preset

PARTS = ("inference", "products", "masks", "train", "hf")


# ------------------------------------------------------------------------------------------------ timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def elapsed_ms(fn, device) -> float:
    """Wall time of one call of fn: CUDA events on a GPU, the host clock elsewhere."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def median_ms(fn, device, repeats: int = 3) -> float:
    return statistics.median(elapsed_ms(fn, device) for _ in range(repeats))


def timed_s(fn, device) -> float:
    """Seconds of a first call (compilation included), for reporting compile time apart."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def ceilings(device) -> dict:
    """Copy bandwidth (bytes read + written per second) and the bf16 matmul rate of this device."""
    m = 8192 if torch.device(device).type == "cuda" else 512  # matmul side
    a, b = (torch.randn(m, m, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_ms = median_ms(lambda: [a @ b for _ in range(10)], device, 5) / 10
    return dict(copy_GBps=measure_copy_GBps(device), matmul_TFLOPs=2 * m**3 / mm_ms / 1e9)


def measure_copy_GBps(device) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB of bf16 (16 MiB off a GPU)."""
    n = 2**29 if torch.device(device).type == "cuda" else 2**23
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: [dst.copy_(src) for _ in range(10)], device, 5) / 10
    return 2 * src.nbytes / copy_ms / 1e6


def free_bytes(device) -> float:
    return torch.cuda.mem_get_info()[0] if torch.device(device).type == "cuda" else float("inf")


# ------------------------------------------------------------------------------------------------ inference
def inference(model, length: int, batch: int, args, copy_GBps: float) -> dict:
    """KV bytes, prefill seconds and decode ms/token of one layout at one context length and batch."""
    cfg, device, new = model.cfg, args.device, args.new_tokens
    need = sum(Cache(cfg, batch, length + new, "meta", torch.bfloat16).nbytes().values())
    if device != "cpu":  # give back what earlier measurements held: their compiled graphs' memory pools, cached blocks
        torch.compiler.reset()
        gc.collect()
        torch.cuda.empty_cache()
    if need + 4 * 2**30 * (device != "cpu") > free_bytes(device):  # 4 GiB for the prefill's activations
        return dict(skipped=f"its {need / 2**30:.1f} GiB KV cache does not fit")
    before = torch.cuda.memory_allocated() if device != "cpu" else 0
    cache = Cache(cfg, batch, length + new, device, torch.bfloat16, flex_decode=args.flex_decode)
    kv_bytes = torch.cuda.memory_allocated() - before if device != "cpu" else need
    cache.mark_static()
    prompts = torch.randint(0, cfg.vocab_size, (batch, length)).tolist()
    with torch.inference_mode():
        prefill(model, cache, warm_up_prompts(prompts, args.chunk), args.chunk)  # compiles flex for these shapes
        out = {}
        prefill_ms = median_ms(lambda: out.update(logits=prefill(model, cache, prompts, args.chunk)), device,
                               prefill_repeats(length, batch))
        token = out["logits"].argmax(-1)
        decode = compiled_decode(device) if args.compile else decode_one
        state = dict(token=token)

        def steps(n):
            for _ in range(n):
                state["token"] = decode(model, cache, state["token"]).argmax(-1)

        compile_s = timed_s(lambda: steps(3), device)  # compile, record the CUDA graph, replay
        decode_ms = median_ms(lambda: steps(new // 4), device) / (new // 4)  # 3 + 3 * new // 4 <= new steps in all
    weights = sum(p.nbytes for p in model.parameters())
    if not cfg.tie_embeddings:
        weights -= model.tok_embeddings.weight.nbytes  # the embedding table is looked up (one row), not read whole
    read = weights + sum(cache.nbytes().values())  # every slot of every layer is read each step
    roofline_ms = read / copy_GBps / 1e6
    return dict(kv_bytes=kv_bytes, kv_full_bytes=cache.full_attention_nbytes(), prefill_s=prefill_ms / 1e3,
                decode_ms=decode_ms, decode_compile_s=compile_s,
                roofline_ms=roofline_ms, roofline_frac=roofline_ms / decode_ms)


def warm_up_prompts(prompts: list[list[int]], chunk: int) -> list[list[int]]:
    """The prompts' first 4 chunks and their last partial chunk: every shape the prefill compiles flex for (the first
    chunk, the second, the third that makes key lengths dynamic, a short last one), without prefilling all of a long
    prompt once more (26 s at 128K)."""
    length = len(prompts[0])
    if length <= 4 * chunk:
        return prompts
    return [p[:4 * chunk + length % chunk] for p in prompts]


def prefill_repeats(length: int, batch: int) -> int:
    """Timed prefills per row: five for short prompts (milliseconds each, where one launch hiccup shows), one for long
    ones (26 s at 128K)."""
    return 5 if length * batch <= 32768 else 1


def profile_prefill(model, layouts: dict, args) -> None:
    """Each layout's prefill of the first length and batch, warmed up: its median time over 10, then the top GPU
    kernels and host operations of one more under the profiler (short prompts are bound by the host's launches)."""
    length, batch = args.lengths[0], args.batch[0]
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, length)).tolist()
    for name, cfg in layouts.items():
        model.cfg = cfg
        cache = Cache(cfg, batch, length + args.new_tokens, args.device, torch.bfloat16)
        with torch.inference_mode():
            prefill(model, cache, prompts, args.chunk)
            ms = median_ms(lambda: prefill(model, cache, prompts, args.chunk), args.device, 10)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                prefill(model, cache, prompts, args.chunk)
                sync(args.device)
        print(f"\n== {name}: prefill of {batch} x {length} tokens, median of 10: {ms:.2f} ms")
        for key in ("self_cuda_time_total", "self_cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


def profile_decode(model, length: int, args) -> None:
    """The top kernels of up to 20 compiled decode steps (products as the first of --decode-kernels says), inside the
    cache's reserved new tokens."""
    kernels.enabled = args.decode_kernels[0] == "fused"
    cache = Cache(model.cfg, args.batch[0], length + args.new_tokens, "cuda", torch.bfloat16)
    cache.mark_static()
    with torch.inference_mode():
        token = prefill(model, cache, torch.randint(0, 1000, (args.batch[0], length)).tolist(), args.chunk).argmax(-1)
        decode = compiled_decode("cuda")
        for _ in range(3):
            token = decode(model, cache, token).argmax(-1)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(min(20, args.new_tokens - 3)):
                token = decode(model, cache, token).argmax(-1)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def graph_ms(fn, device) -> float:
    """Median ms of fn replayed as one CUDA graph (no launch gaps between its kernels); on a CPU, of fn itself."""
    if torch.device(device).type != "cuda":
        return median_ms(fn, device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(), fn()  # warm-up outside the graph: Triton's autotuning runs here
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, device, 5)


def products(cfg, args, copy_GBps: float) -> list[dict]:
    """Each matrix-vector product of a batch-1 decoding step, three ways: cuBLAS alone (F.linear); the plain step (its
    RMSNorm or SiLU x up as kernels of their own, then cuBLAS, then the residual add); decoding/kernels.py's fused
    kernel, which does all of it in one. Weights rotate through copies of 4x the L2 cache, so each is read from
    memory."""
    device, dtype = args.device, torch.bfloat16
    D, Fd, E = cfg.dim, cfg.ffn_dim, cfg.head_dim
    shapes = {"wqkv, RMSNorm in": ("norm", (cfg.n_heads + 2 * cfg.n_kv_heads) * E, D),
              "wo, + residual": ("residual", D, cfg.n_heads * E),
              "w13, RMSNorm in": ("norm", 2 * Fd, D),
              "w2, SiLU x up in, + residual": ("gated", D, Fd),
              "output, RMSNorm in": ("norm", cfg.vocab_size, D)}
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device != "cpu" else 0
    rows = []
    for name, (kind, N, K) in shapes.items():
        weights = [torch.randn(N, K, device=device, dtype=dtype) / K**0.5
                   for _ in range(max(1, math.ceil(4 * l2 / (N * K * 2))))]
        x = torch.randn(1, 1, 2 * K if kind == "gated" else K, device=device, dtype=dtype)
        res, norm = torch.randn(1, 1, N, device=device, dtype=dtype), RMSNorm(K, 1e-5).to(device, dtype)
        layers = [nn.Linear(K, N, bias=False, device="meta") for _ in weights]
        for layer, w in zip(layers, weights):
            layer.weight = nn.Parameter(w, requires_grad=False)
        plain, fused = {
            "norm": (lambda w, _: kernels.norm_linear_reference(x, norm.weight, norm.eps, w),
                     lambda _, layer: kernels.norm_linear(x, norm, layer)),
            "residual": (lambda w, _: kernels.linear_reference(x, w, res),
                         lambda _, layer: kernels.linear(x, layer, res)),
            "gated": (lambda w, _: kernels.gated_linear_reference(x, w, res),
                      lambda _, layer: kernels.gated_linear(x, layer, res)),
        }[kind]
        alone = (lambda w, _: F.linear(x[..., :K], w))
        ms = {key: graph_ms(lambda: [fn(w, layer) for w, layer in zip(weights, layers)], device) / len(weights)
              for key, fn in (("cublas", alone), ("plain", plain), ("fused", fused))}
        rate = {f"{key}_GBps": N * K * 2 / t / 1e6 for key, t in ms.items()}
        rows.append(dict(product=name, N=N, K=K, fused_ran=kernels.fused_ok(x, weights[0]),
                         **{f"{key}_us": t * 1e3 for key, t in ms.items()}, **rate,
                         fused_of_copy=rate["fused_GBps"] / copy_GBps))
        del weights, layers
    return rows


# ------------------------------------------------------------------------------------------------ masks, training
def mask_build_ms(cfg, length: int, device) -> float:
    """Median time to build one sparse kind's BlockMask for a whole sequence (what each training forward does)."""
    kind = next(k for k in cfg.layer_kinds if k != "full")
    return median_ms(lambda: block_mask(cfg.pattern(kind), length, length, block_size=cfg.mask_block, device=device),
                     device, 7)


def train_layout(base, sparse: str | None, n_layers: int) -> tuple[str, ...]:
    """A reduced stack with LongGen's ratio of full layers (12 of 32 is 3 of 8), the full ones in the middle."""
    if sparse is None:
        return ("full",) * n_layers
    n_full = round(n_layers * longgen.longgen_layout(base.n_layers, sparse=sparse).count("full") / base.n_layers)
    below = (n_layers - n_full) // 2
    return (sparse,) * below + ("full",) * n_full + (sparse,) * (n_layers - n_full - below)


def peak_bytes(device) -> int:
    """The most memory allocated since the last call (0 on a CPU)."""
    if torch.device(device).type != "cuda":
        return 0
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def train_step(cfg, length: int, precision: str, args) -> dict:
    """ms of one forward + backward of the training loss on one sequence, as train.py runs it (bf16 weights here; no
    optimizer step, whose time does not depend on attention). precision float8: the blocks' linear layers in float8,
    as train.py's float8=true."""
    device = args.device
    model = build(cfg, device=device, dtype=torch.bfloat16)
    if precision == "float8":
        train.convert_float8(model, device)
    peak_bytes(device)  # from here: the compiling step's peak, then the timed steps' (compiling allocates its own)
    for i, block in enumerate(model.layers):
        model.layers[i] = train.wrap_block(block, activation_checkpointing=True, compile=args.compile)
    tokens = torch.randint(0, cfg.vocab_size, (1, length + 1), device=device)
    doc_ids = torch.zeros_like(tokens)

    def step():
        train.lm_loss(model, tokens, doc_ids, doc_masking=False, loss_chunk=args.loss_chunk).backward()
        model.zero_grad(set_to_none=True)

    try:
        compile_s, compile_peak = timed_s(step, device), peak_bytes(device)
        ms, peak = median_ms(step, device), peak_bytes(device)
    except torch.OutOfMemoryError:
        return dict(skipped="out of memory")
    pairs = {k: cfg.pattern(k).pairs(length) for k in set(cfg.layer_kinds)}
    return dict(step_ms=ms, compile_s=compile_s, peak_bytes=peak, compile_peak_bytes=compile_peak,
                attn_pairs=sum(pairs[k] for k in cfg.layer_kinds), loss_chunk=args.loss_chunk)


def hf_decode(cfg, length: int, args) -> dict:
    """transformers' Llama (full attention, same shapes, random weights) generating greedily with its static cache,
    which it compiles itself on a GPU: decode ms/token from the time of new_tokens + 1 minus 1 new tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                         max_position_embeddings=length + args.new_tokens + 1, tie_word_embeddings=cfg.tie_embeddings)
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(hf_cfg, dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, length), device=args.device)

    def run(n):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, cache_implementation="static", pad_token_id=0)

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compile_s = timed_s(lambda: run(args.new_tokens + 1), args.device)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    one = median_ms(lambda: run(1), args.device)
    many = median_ms(lambda: run(args.new_tokens + 1), args.device)
    del model
    return dict(decode_ms=(many - one) / args.new_tokens, compile_s=compile_s, compiled=compiled)


# ------------------------------------------------------------------------------------------------ the run
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="16k,32k,64k,128k", help="context lengths (prompt tokens), e.g. 4k,32k")
    p.add_argument("--batch", default="1,8", help="decode batch sizes (inference part)")
    p.add_argument("--variant", default="sink_window,strided", help="LongGen sparse variants to compare")
    p.add_argument("--parts", default=",".join(PARTS), help=f"what to measure, any of: {', '.join(PARTS)}")
    p.add_argument("--preset", default="llama-2-7b", help="model shapes (model.py presets)")
    p.add_argument("--layers", type=int, help="model depth for inference (default: the preset's)")
    p.add_argument("--train-layers", type=int, default=8, help="depth of the training-step model (full width)")
    p.add_argument("--train-lengths", help="training-step lengths (default: --lengths)")
    p.add_argument("--train-precision", default="bf16", help="the training step's linear layers: bf16, float8 "
                                                               "(torchao, as train.py float8=true) or bf16,float8")
    p.add_argument("--loss-chunk", type=int, default=4096, help="tokens whose logits exist at once in the training "
                                                                "loss, as train.py's loss_chunk (0: all)")
    p.add_argument("--hf-lengths", help="lengths for the transformers peer (default: --lengths)")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="decode steps reserved (at least 12): 3 compile, then 3 runs of a quarter of them are timed")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk, as generate.py --chunk")
    p.add_argument("--flex-decode", default="", help="attention kinds that decode with flex decoding instead of "
                                                     "SDPA with a dense mask, e.g. full,sink_window")
    p.add_argument("--decode-kernels", default="fused", help="decoding's products: fused (Triton GEMVs "
                                                               "with RMSNorm, SiLU and residuals inside, at batch 1 on "
                                                               "a GPU), plain (cuBLAS and separate kernels), or both: "
                                                               "fused,plain")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager decode and training steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write every number here (rewritten after each measurement)")
    p.add_argument("--profile", nargs="?", const="decode", choices=("decode", "prefill"),
                   help="instead: profile 20 decode steps of the first length, every layer full (decode, the "
                        "default), or the prefill of the first length and batch in every layout (prefill), and print "
                        "the top kernels and host operations")
    args = p.parse_args(argv)
    args.lengths = [parse_length(t) for t in args.lengths.split(",")]
    args.train_lengths = [parse_length(t) for t in args.train_lengths.split(",")] if args.train_lengths \
        else args.lengths
    args.hf_lengths = [parse_length(t) for t in args.hf_lengths.split(",")] if args.hf_lengths else args.lengths
    args.batch = [int(b) for b in args.batch.split(",")]
    args.variant = args.variant.split(",")
    args.flex_decode = [k for k in args.flex_decode.split(",") if k]
    args.decode_kernels = args.decode_kernels.split(",")
    if not args.decode_kernels or set(args.decode_kernels) - {"fused", "plain"}:
        raise UserError("--decode-kernels takes fused, plain or fused,plain.")
    args.train_precision = args.train_precision.split(",")
    if not args.train_precision or set(args.train_precision) - {"bf16", "float8"}:
        raise UserError("--train-precision takes bf16, float8 or bf16,float8.")
    args.parts = args.parts.split(",")
    if set(args.parts) - set(PARTS):
        raise UserError(f"Unknown parts {sorted(set(args.parts) - set(PARTS))}; choose from: {', '.join(PARTS)}.")
    if args.loss_chunk < 0:
        raise UserError("--loss-chunk must be >= 0 (0: the whole sequence at once).")
    if args.new_tokens < 12:
        raise UserError("--new-tokens must be at least 12: 3 steps compile, then 3 timed runs of a quarter of them "
                        "decode inside the cache's reserved tokens.")
    return args


def run(args) -> dict:
    compile_settings()
    torch._dynamo.config.recompile_limit = 64  # one decode compile per (layout, length, batch), all measured
    torch.manual_seed(0)
    report = dict(device=torch.cuda.get_device_name() if args.device != "cpu" else "cpu", torch=torch.__version__,
                  preset=args.preset, flex_decode=args.flex_decode, **ceilings(args.device), inference=[], products=[],
                  masks=[], train=[], hf=[])
    print(f"ceilings: copy {report['copy_GBps']:.0f} GB/s, bf16 matmul {report['matmul_TFLOPs']:.3g} TFLOP/s",
          flush=True)

    def record(part, row):
        report[part].append(row)
        print(part, row, flush=True)
        if args.json:
            write_atomic(args.json, json.dumps(report, indent=1))

    longest = max(args.lengths + args.train_lengths + args.hf_lengths) + args.new_tokens + 1
    base = preset(args.preset, max_seq_len=longest, **({"n_layers": args.layers} if args.layers else {}))
    layouts = {"full": base, **{f"longgen {v}": longgen.convert(base, sparse=v) for v in args.variant}}

    def decoding_model():  # with the fused products, which --decode-kernels turns on or off (kernels.enabled)
        return kernels.use_fused_decoding(build(base, device=args.device, dtype=torch.bfloat16).eval())

    if args.profile == "decode":
        return profile_decode(decoding_model(), args.lengths[0], args)
    if args.profile == "prefill":
        return profile_prefill(decoding_model(), layouts, args)
    if "masks" in args.parts:
        for length in args.lengths:
            for v in args.variant:
                record("masks", dict(variant=v, length=length, build_ms=mask_build_ms(layouts[f"longgen {v}"],
                                                                                      length, args.device)))
    if "inference" in args.parts:
        model = decoding_model()
        for length in args.lengths:
            for batch in args.batch:
                for name, cfg in layouts.items():
                    for products_ in args.decode_kernels:
                        model.cfg, kernels.enabled = cfg, products_ == "fused"
                        record("inference", dict(layout=name, length=length, batch=batch,
                                                 full_layers=cfg.layer_kinds.count("full"), kernels=products_,
                                                 **inference(model, length, batch, args, report["copy_GBps"])))
        kernels.enabled = True
        del model
    if "products" in args.parts:
        for row in products(base, args, report["copy_GBps"]):
            record("products", row)
    if "train" in args.parts:
        small = replace(base, n_layers=args.train_layers, layer_kinds=("full",) * args.train_layers)
        for length in args.train_lengths:
            for precision in args.train_precision:
                for sparse in [None, *args.variant]:
                    cfg = replace(small, layer_kinds=train_layout(base, sparse, args.train_layers))
                    sync(args.device)
                    record("train", dict(layout=f"longgen {sparse}" if sparse else "full", length=length,
                                         precision=precision, layers=cfg.n_layers,
                                         full_layers=cfg.layer_kinds.count("full"),
                                         **train_step(cfg, length, precision, args)))
                    if args.device != "cpu":
                        torch.cuda.empty_cache()
    if "hf" in args.parts:
        for length in args.hf_lengths:
            record("hf", dict(length=length, **hf_decode(base, length, args)))
    return report


# ------------------------------------------------------------------------------------------------ the tables
def ratio(ref, row, key):
    """How many times faster `row` is than the full-attention `ref` (blank for the reference itself)."""
    if row is ref or ref is None or "skipped" in ref:
        return ""
    return f"{ref[key] / row[key]:.2f}x"


def tables(report: dict) -> str:
    out = [f"{report['device']}, torch {report['torch']}, {report['preset']} shapes, bf16; copy "
           f"{report['copy_GBps']:.0f} GB/s, matmul {report['matmul_TFLOPs']:.3g} TFLOP/s"]

    def find(part, **match):
        """The first row of `part` with these values (None if there is none)."""
        return next((r for r in report[part] if all(r[k] == v for k, v in match.items())), None)

    if report["inference"]:
        out.append("\n| context | batch | layout | products | KV GiB | KV vs full | prefill s | speed-up | decode ms | "
                   "speed-up | of roofline |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for r in report["inference"]:
            f = find("inference", layout="full", length=r["length"], batch=r["batch"], kernels=r["kernels"])
            if "skipped" in r:
                out.append(f"| {r['length']} | {r['batch']} | {r['layout']} | {r['kernels']} | skipped: {r['skipped']} "
                           "|||||||")
                continue
            kv = f"{r['kv_bytes'] / f['kv_bytes'] - 1:+.0%}" if f and f is not r and "skipped" not in f else ""
            out.append(f"| {r['length']} | {r['batch']} | {r['layout']} | {r['kernels']} | "
                       f"{r['kv_bytes'] / 2**30:.2f} | {kv} | {r['prefill_s']:.3f} | {ratio(f, r, 'prefill_s')} | "
                       f"{r['decode_ms']:.2f} | {ratio(f, r, 'decode_ms')} | {r['roofline_frac']:.0%} |")
    if report["products"]:
        out.append("\n| decoding product | N x K | cuBLAS alone us | GB/s | plain step us | fused us | GB/s | "
                   "fused of copy |\n|---|---|---|---|---|---|---|---|")
        out += [f"| {r['product']} | {r['N']} x {r['K']} | {r['cublas_us']:.1f} | {r['cublas_GBps']:.0f} | "
                f"{r['plain_us']:.1f} | {r['fused_us']:.1f} | {r['fused_GBps']:.0f} | {r['fused_of_copy']:.0%} |"
                for r in report["products"]]
    if report["masks"]:
        out.append("\n| context | variant | BlockMask build ms |\n|---|---|---|")
        out += [f"| {r['length']} | {r['variant']} | {r['build_ms']:.1f} |" for r in report["masks"]]
    if report["train"]:
        out.append("\n| context | layout | layers (full) | linears | step ms | speed-up | float8 vs bf16 | peak GiB | "
                   "peak GiB, compiling step | loss chunk |\n|---|---|---|---|---|---|---|---|---|---|")
        for r in report["train"]:
            f = find("train", layout="full", length=r["length"], precision=r["precision"])
            if "skipped" in r:
                out.append(f"| {r['length']} | {r['layout']} | {r['layers']} ({r['full_layers']}) | {r['precision']} | "
                           f"skipped: {r['skipped']} ||||||")
                continue
            bf16 = find("train", layout=r["layout"], length=r["length"], precision="bf16") \
                if r["precision"] == "float8" else None
            out.append(f"| {r['length']} | {r['layout']} | {r['layers']} ({r['full_layers']}) | {r['precision']} | "
                       f"{r['step_ms']:.1f} | {ratio(f, r, 'step_ms')} | {ratio(bf16, r, 'step_ms')} | "
                       f"{r['peak_bytes'] / 2**30:.1f} | {r['compile_peak_bytes'] / 2**30:.1f} | "
                       f"{r['loss_chunk'] or 'all'} |")
    if report["hf"]:
        out.append("\n| context | transformers (static cache, compiled) decode ms | ours, full, batch 1 | compiled |"
                   "\n|---|---|---|---|")
        for r in report["hf"]:
            ours = next((x for x in report["inference"] if x["layout"] == "full" and x["length"] == r["length"]
                         and x["batch"] == 1 and "skipped" not in x), None)
            out.append(f"| {r['length']} | {r['decode_ms']:.2f} | {ours['decode_ms']:.2f} |" if ours else
                       f"| {r['length']} | {r['decode_ms']:.2f} | |")
            out[-1] += f" {r['compiled']} |"
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    if report:
        print("\n" + tables(report))


if __name__ == "__main__":
    run_cli(main)
