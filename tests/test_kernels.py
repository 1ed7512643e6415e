"""decoding/kernels.py's fused Triton GEMVs against their PyTorch references: on a GPU (the kernels themselves, then a
compiled decoding run with and without them), and on a CPU through Triton's interpreter when Triton is installed (the
CPU wheel of torch comes without it, so CI skips that test; `pip install triton` runs it)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from decoding import kernels
from generate import compiled_decode, prefill
from cache import Cache
from model import RMSNorm, build, init_weights, preset

needs_gpu_triton = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton is not None),
                                      reason="needs a CUDA GPU with Triton")


def modules(w: Tensor, norm: Tensor, eps: float = 1e-5) -> tuple[RMSNorm, nn.Linear]:
    """model.py's RMSNorm and an nn.Linear holding these weights: what the entry points take."""
    rms, layer = RMSNorm(w.shape[1], eps), nn.Linear(w.shape[1], w.shape[0], bias=False)
    rms.weight, layer.weight = nn.Parameter(norm, requires_grad=False), nn.Parameter(w, requires_grad=False)
    return rms, layer


def cases(N: int, K: int, device, dtype=torch.bfloat16):
    """(name, fused output, reference output) for every entry point, with and without a residual."""
    g = torch.Generator(device="cpu").manual_seed(N * 7 + K)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    w, x, gate_up, res, norm = rand(N, K) / K**0.5, rand(1, 1, K) * 3, rand(1, 1, 2 * K), rand(1, 1, N), rand(K)
    rms, layer = modules(w, norm)
    return [("norm_linear", kernels.norm_linear(x, rms, layer), kernels.norm_linear_reference(x, norm, 1e-5, w)),
            ("linear", kernels.linear(x, layer), kernels.linear_reference(x, w)),
            ("linear + residual", kernels.linear(x, layer, res), kernels.linear_reference(x, w, res)),
            ("gated_linear", kernels.gated_linear(gate_up, layer), kernels.gated_linear_reference(gate_up, w)),
            ("gated_linear + residual", kernels.gated_linear(gate_up, layer, res),
             kernels.gated_linear_reference(gate_up, w, res))]


def assert_within_rounding(name, out, ref):
    """Equal up to the output dtype's rounding: the sums run in fp32 in both, in different orders."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, name
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


@needs_gpu_triton
@pytest.mark.parametrize("N, K", [(12288, 4096), (4096, 11008), (32000, 4096), (1000, 300), (5, 64)])
def test_fused_products_match_the_references_on_gpu(N, K):
    x, w = torch.zeros(1, 1, K, device="cuda", dtype=torch.bfloat16), torch.zeros(N, K, device="cuda",
                                                                                   dtype=torch.bfloat16)
    assert kernels.fused_ok(x, w)  # the Triton path really runs below
    for name, out, ref in cases(N, K, "cuda"):
        assert_within_rounding(name, out, ref)


def rope_case(H: int, G: int, E: int, K: int, C: int, device, slot: int = 5, pos: int = 7):
    """norm_qkv_rope's inputs for one token (caches of C random slots; tables for 3 * pos positions: random RoPE angles,
    and slots that put `pos` in slot `slot`) and the reference's queries and caches."""
    g = torch.Generator().manual_seed(H * 1000 + E + K)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)  # noqa: E731
    angles = (torch.rand(3 * pos, E // 2, generator=g) * 1000).repeat(1, 2)  # half-split: j and j + E/2 share one
    t = dict(x=rand(1, 1, K) * 3, w=rand((H + 2 * G) * E, K) / K**0.5, norm=rand(K),
             table=tuple(f(angles).to(device=device, dtype=torch.bfloat16) for f in (torch.cos, torch.sin)),
             pos=torch.tensor([pos], device=device, dtype=torch.int32), k=rand(1, G, C, E), v=rand(1, G, C, E),
             slots=torch.randint(0, C, (3 * pos,), generator=g).index_fill(0, torch.tensor(pos), slot).to(
                 device=device, dtype=torch.int32))
    k_ref, v_ref = t["k"].clone(), t["v"].clone()
    q_ref = kernels.norm_qkv_rope_reference(t["x"], t["norm"], 1e-5, t["w"], t["table"], t["pos"], k_ref, v_ref,
                                            t["slots"], H)
    return t, (q_ref, k_ref, v_ref)


def check_rope(name: str, outs, refs, s: int) -> None:
    """Queries and the written slot s within rounding; every other slot of the caches untouched."""
    for part, out, ref in zip(("queries", "keys", "values"), outs, refs):
        if part == "queries":
            assert_within_rounding(f"{name}: {part}", out, ref)
            continue
        assert_within_rounding(f"{name}: {part} written", out[:, :, s], ref[:, :, s])
        others = torch.arange(out.shape[2], device=out.device) != s
        assert torch.equal(out[:, :, others], ref[:, :, others]), f"{name}: {part} outside the slot changed"


@needs_gpu_triton
@pytest.mark.parametrize("H, G, E, K, C", [(32, 32, 128, 4096, 4224), (9, 3, 64, 576, 256), (4, 2, 16, 64, 128)])
def test_fused_rope_and_cache_write_match_the_reference_on_gpu(H, G, E, K, C):
    """Llama-2-7B's, SmolLM2's and the tiny preset's attention shapes: queries out, keys and values into one slot."""
    t, refs = rope_case(H, G, E, K, C, "cuda", slot=C - 3)
    rms, layer = modules(t["w"], t["norm"])
    assert kernels.rope_fusable(t["x"], rms, layer, t["table"], t["k"])  # the Triton path really runs below
    q = kernels.norm_qkv_rope(t["x"], rms, layer, t["table"], t["pos"], t["k"], t["v"], t["slots"], H)
    check_rope(f"{H} heads, {G} key/value heads", (q, t["k"], t["v"]), refs, C - 3)


@needs_gpu_triton
def test_a_module_swapped_in_for_a_linear_runs_as_itself():
    """What the fused kernel may replace is a plain nn.Linear: a subclass (torchao's Float8Linear in float8 training)
    keeps its own forward, where the kernel would take the call."""
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(1, 1, 64, device="cuda", dtype=torch.bfloat16)
    layer = Doubled(64, 32, bias=False, device="cuda", dtype=torch.bfloat16)
    assert kernels.fused_ok(x, layer.weight)
    torch.testing.assert_close(kernels.linear(x, layer), 2 * torch.nn.functional.linear(x, layer.weight))


def test_the_references_run_where_the_kernel_cannot():
    """More than one row, fp32, or a CPU tensor: the plain PyTorch path, exactly."""
    w, norm = torch.randn(8, 16), torch.randn(16)
    for x in (torch.randn(1, 2, 16), torch.randn(1, 1, 16)):  # two rows; one row but fp32 on a CPU
        assert not kernels.fused_ok(x, w, norm)
        assert torch.equal(kernels.norm_linear(x, *modules(w, norm)), kernels.norm_linear_reference(x, norm, 1e-5, w))


def test_fused_decoding_is_installed_from_outside_and_changes_nothing_where_its_kernels_cannot_run():
    """use_fused_decoding swaps the fused forward into a model.py model (same weights and state_dict keys); on a CPU,
    where no Triton kernel runs, every result is bit for bit model.py's: logits, loss, gradients, cached decoding."""
    torch.manual_seed(0)
    plain = build(preset("tiny", layer_kinds=("sink_window", "strided", "full") * 2))
    init_weights(plain, std=0.08)
    fused = build(plain.cfg, plain.state_dict())
    assert kernels.use_fused_decoding(fused) is fused and kernels.use_fused_decoding(fused) is fused  # idempotent
    assert type(fused) is kernels.FusedTransformer and {type(b) for b in fused.layers} == {kernels.FusedBlock}
    assert type(plain).__name__ == "Transformer" and list(fused.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(0, 512, (1, 60))
    out = {}
    for name, m in (("plain", plain), ("fused", fused)):
        m.zero_grad()
        m(tokens, targets=tokens).backward()
        with torch.no_grad():
            cache = Cache(m.cfg, 1, 80)
            logits, steps = prefill(m, cache, [tokens[0].tolist()], 16), []
            for _ in range(15):  # past the tiny window's ring wrap
                steps.append(logits)
                logits = m(logits.argmax(-1)[:, None], cache=cache)[:, 0]
            out[name] = (m(tokens), torch.stack(steps), torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(out["plain"], out["fused"]))


@needs_gpu_triton
@pytest.mark.parametrize("attn", [(), ("sink_window", "strided", "full", "full", "strided", "sink_window")],
                         ids=["full", "mixed"])
def test_compiled_decoding_with_fused_products_matches_plain_products(attn):
    """A tiny model, batch 1, compiled CUDA-graph decoding of the same 40 tokens (the plain run's greedy choices, fed to
    every run): the bf16 logits with fused kernels are as close to the same model's fp32 logits as the plain bf16
    path's are, and pick the same token wherever the plain path's choice is clear of rounding. Every layer full, and
    the three kinds mixed: the 200-token prompt and 40 steps pass the window (24) and the stride period (32), so the
    fused cache write lands in ring slots that wrap."""
    torch.manual_seed(0)
    model = build(preset("tiny", layer_kinds=attn))
    init_weights(model, std=0.08)
    models = {"fp32": model.to("cuda").eval(), "plain": build(model.cfg).to("cuda", torch.bfloat16).eval()}
    models["plain"].load_state_dict(model.state_dict())  # model.py as it is
    models["fused"] = kernels.use_fused_decoding(build(model.cfg).to("cuda", torch.bfloat16).eval())
    models["fused"].load_state_dict(model.state_dict())
    prompt, tokens, runs = torch.randint(0, 512, (200,)).tolist(), None, {}
    for name in ("plain", "fused", "fp32"):  # plain first: its greedy tokens are everyone's inputs
        m = models[name]
        cache = Cache(m.cfg, 1, 260, "cuda", m.output.weight.dtype)
        cache.mark_static()
        decode, steps = compiled_decode("cuda"), []
        with torch.inference_mode():
            logits = prefill(m, cache, [prompt], 128)
            for i in range(40):
                steps.append(logits.float().clone())
                logits = decode(m, cache, logits.argmax(-1) if tokens is None else tokens[i])
        runs[name] = torch.stack(steps)
        tokens = runs["plain"].argmax(-1)
    fused, plain, exact = runs["fused"], runs["plain"], runs["fp32"]
    assert (fused - exact).abs().mean() <= 1.5 * (plain - exact).abs().mean()
    assert_within_rounding("decoding logits", fused, plain)
    top2 = plain.topk(2, -1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * (fused - plain).abs().amax(-1)
    assert clear.sum() >= 10 and torch.equal(fused.argmax(-1)[clear], plain.argmax(-1)[clear])


# ------------------------------------------------------------------------------------------------ tiles per GPU
def test_tiles_come_from_this_gpus_entry_else_the_h100_rules(tmp_path, monkeypatch):
    """decoding/kernels.py reads its tiles from tiles.json by GPU (name and compute capability), shape by shape; a GPU
    or a shape without an entry takes the H100 rules. benchmarks/bench_tiles.py merges an entry in atomically, keeping
    the others."""
    from benchmarks import bench_tiles
    from errors import UserError

    path, ours, other = tmp_path / "tiles.json", "NVIDIA Test (sm_90)", "NVIDIA Other (sm_80)"
    monkeypatch.setattr(kernels, "TILES_PATH", path)
    kernels.tuned.cache_clear()
    try:
        rules = {(4096, 4096): (2, 2048, 8, None), (4096, 11008): (8, 2048, 8, None), (12288, 4096): (2, 1024, 4, None),
                 (5, 64): (2, 64, 8, None)}
        assert all(kernels.gemv_tiles(N, K, ours) == t for (N, K), t in rules.items())  # no table yet
        assert kernels.rope_tiles(128, 4096, ours) == (1, 512, 4, 1) and kernels.device_key("cpu") == ""
        bench_tiles.write_entry(path, ours, {"gemv": {"4096x4096": [4, 1024, 4, 3]},
                                             "norm_qkv_rope": {"128x4096": [1, 512, 4, 1]}})
        bench_tiles.write_entry(path, other, {"gemv": {"4096x4096": [1, 512, 4, 1]}})
        bench_tiles.write_entry(path, ours, {"norm_qkv_rope": {"128x4096": [2, 1024, 8, 3]}})  # a later sweep
        kernels.tuned.cache_clear()
        assert kernels.gemv_tiles(4096, 4096, ours) == (4, 1024, 4, 3)
        assert kernels.gemv_tiles(4096, 4096, other) == (1, 512, 4, 1)
        assert kernels.gemv_tiles(4096, 11008, ours) == rules[4096, 11008]  # a shape not swept
        assert kernels.gemv_tiles(4096, 4096, "NVIDIA Unknown (sm_100)") == rules[4096, 4096]
        assert kernels.rope_tiles(128, 4096, ours) == (2, 1024, 8, 3)  # the later sweep replaced that part
        assert [p.name for p in tmp_path.iterdir()] == ["tiles.json"]  # no temporary file left
        path.write_text("{half written")
        kernels.tuned.cache_clear()
        with pytest.raises(UserError, match="benchmarks.bench_tiles"):
            kernels.gemv_tiles(4096, 4096, ours)
    finally:
        kernels.tuned.cache_clear()


@needs_gpu_triton
def test_products_with_this_gpus_swept_tiles_match_the_references(tmp_path, monkeypatch):
    """The entry points on a GPU take the tiles of this GPU's tiles.json entry (odd ones here) and stay exact."""
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({kernels.device_key("cuda"): {"gemv": {"1000x300": [1, 128, 2, 1]},
                                                              "norm_qkv_rope": {"16x64": [4, 32, 2, 3]}}}))
    monkeypatch.setattr(kernels, "TILES_PATH", path)
    kernels.tuned.cache_clear()
    try:
        assert kernels.gemv_tiles(1000, 300, kernels.device_key("cuda")) == (1, 128, 2, 1)
        for name, out, ref in cases(1000, 300, "cuda"):
            assert_within_rounding(name, out, ref)
        t, refs = rope_case(4, 2, 16, 64, 12, "cuda")
        rms, layer = modules(t["w"], t["norm"])
        q = kernels.norm_qkv_rope(t["x"], rms, layer, t["table"], t["pos"], t["k"], t["v"], t["slots"], 4)
        check_rope("swept tiles", (q, t["k"], t["v"]), refs, 5)
    finally:
        kernels.tuned.cache_clear()


# ------------------------------------------------------------------------------------------------ Triton's interpreter
def interpreted_checks() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1: the kernel on CPU tensors, small tiles, shapes that the tiles do
    not divide, every prologue, with and without a residual. The interpreter truncates fp32 to bf16 where a GPU
    rounds to nearest, so it is off by up to 2 units in the last place here, within assert_within_rounding."""
    for N, K in ((37, 200), (64, 256), (3, 1000)):
        g = torch.Generator().manual_seed(N + K)
        rand = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)  # noqa: E731
        w, x, gate_up, res, norm = rand(N, K) / K**0.5, rand(K) * 3, rand(2 * K), rand(N), rand(K)
        for prologue, inp, ref in ((kernels.NONE, x, kernels.linear_reference(x[None], w)[0]),
                                   (kernels.RMSNORM, x, kernels.norm_linear_reference(x[None], norm, 1e-5, w)[0]),
                                   (kernels.SWIGLU, gate_up, kernels.gated_linear_reference(gate_up[None], w)[0])):
            for residual, tiles in ((False, (4, 64, 4, None)), (True, (4, 64, 4, None)), (True, (1, 128, 2, 1))):
                y = kernels.launch_gemv(inp, w, norm, res, 1e-5, prologue, residual, tiles)  # as bench_tiles does
                assert_within_rounding(f"prologue {prologue}, residual {residual}, {N} x {K}", y,
                                       (res + ref) if residual else ref)
    for H, G, E, K, block_p in ((3, 1, 8, 200, 1), (4, 2, 16, 64, 2)):  # K = 200: not a multiple of BLOCK_K
        t, refs = rope_case(H, G, E, K, 12, "cpu")
        q = kernels.launch_norm_qkv_rope(t["x"], t["w"], t["norm"], 1e-5, *t["table"], t["pos"], t["k"], t["v"],
                                         t["slots"], H, (block_p, 64, 4, 1))
        check_rope(f"{H} heads, {G} key/value heads, E {E}", (q, t["k"], t["v"]), refs, 5)


def interpreter_unusable() -> str:
    """Why the interpreter test cannot run here ('' when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if torch.cuda.is_available():
        return "a GPU is here: the tests above run the kernel itself"
    if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 3):
        return "Triton 3.6's interpreter fails with numpy >= 2.3 (pip install 'numpy<2.3' to run it)"
    return ""


@pytest.mark.skipif(bool(interpreter_unusable()), reason=interpreter_unusable() or "-")
def test_kernel_arithmetic_in_the_triton_interpreter():
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", "import test_kernels; test_kernels.interpreted_checks()"], env=env,
                   check=True, cwd=here)
