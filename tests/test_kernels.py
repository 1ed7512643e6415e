"""kernels.py's fused Triton GEMVs against their PyTorch references: on a GPU (the kernels themselves, then a compiled
decoding run with and without them), and on a CPU through Triton's interpreter when Triton is installed (the CPU
wheel of torch comes without it, so CI skips that test; `pip install triton` runs it)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from generate import compiled_decode, prefill
from cache import Cache
from model import build, init_weights, preset

needs_gpu_triton = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton is not None),
                                      reason="needs a CUDA GPU with Triton")


def cases(N: int, K: int, device, dtype=torch.bfloat16):
    """(name, fused output, reference output) for every entry point, with and without a residual."""
    g = torch.Generator(device="cpu").manual_seed(N * 7 + K)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    w, x, gate_up, res, norm = rand(N, K) / K**0.5, rand(1, 1, K) * 3, rand(1, 1, 2 * K), rand(1, 1, N), rand(K)
    return [("norm_linear", kernels.norm_linear(x, norm, 1e-5, w), kernels.norm_linear_reference(x, norm, 1e-5, w)),
            ("linear", kernels.linear(x, w), kernels.linear_reference(x, w)),
            ("linear + residual", kernels.linear(x, w, res), kernels.linear_reference(x, w, res)),
            ("gated_linear", kernels.gated_linear(gate_up, w), kernels.gated_linear_reference(gate_up, w)),
            ("gated_linear + residual", kernels.gated_linear(gate_up, w, res),
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


def test_the_references_run_where_the_kernel_cannot():
    """More than one row, fp32, or a CPU tensor: the plain PyTorch path, exactly."""
    w, norm = torch.randn(8, 16), torch.randn(16)
    for x in (torch.randn(1, 2, 16), torch.randn(1, 1, 16)):  # two rows; one row but fp32 on a CPU
        assert not kernels.fused_ok(x, w, norm)
        assert torch.equal(kernels.norm_linear(x, norm, 1e-5, w), kernels.norm_linear_reference(x, norm, 1e-5, w))


@needs_gpu_triton
def test_compiled_decoding_with_fused_products_matches_plain_products():
    """A bf16 tiny model, batch 1, compiled CUDA-graph decoding: the fused kernels give the plain path's greedy tokens
    and its logits up to bf16 rounding."""
    torch.manual_seed(0)
    model = build(preset("tiny"))
    init_weights(model, std=0.08)  # peaked logits: no near-ties
    model = model.to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, 512, (200,)).tolist()
    runs = {}
    for fused in (True, False):
        kernels.enabled = fused
        try:
            cache = Cache(model.cfg, 1, 260, "cuda", torch.bfloat16)
            cache.mark_static()
            decode, steps = compiled_decode("cuda"), []
            logits = prefill(model, cache, [prompt], 128)
            for _ in range(40):
                steps.append(logits.clone())
                logits = decode(model, cache, logits.argmax(-1))
            runs[fused] = torch.stack(steps)
        finally:
            kernels.enabled = True
    assert torch.equal(runs[True].argmax(-1), runs[False].argmax(-1))
    assert_within_rounding("decoding logits", runs[True], runs[False])


# ------------------------------------------------------------------------------------------------ Triton's interpreter
def interpreted_checks() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1: the kernel on CPU tensors, small tiles, shapes that the tiles do
    not divide, every prologue, with and without a residual."""
    import triton

    for N, K in ((37, 200), (64, 256), (3, 1000)):
        g = torch.Generator().manual_seed(N + K)
        rand = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)  # noqa: E731
        w, x, gate_up, res, norm = rand(N, K) / K**0.5, rand(K) * 3, rand(2 * K), rand(N), rand(K)
        for prologue, inp, ref in ((kernels.NONE, x, kernels.linear_reference(x[None], w)[0]),
                                   (kernels.RMSNORM, x, kernels.norm_linear_reference(x[None], norm, 1e-5, w)[0]),
                                   (kernels.SWIGLU, gate_up, kernels.gated_linear_reference(gate_up[None], w)[0])):
            for residual in (False, True):
                y = torch.empty(N, dtype=torch.bfloat16)
                kernels._gemv_kernel.fn[(triton.cdiv(N, 4),)](w, inp, norm, res, y, N, K, 1e-5, PROLOGUE=prologue,
                                                               RESIDUAL=residual, BLOCK_N=4, BLOCK_K=64)
                assert_within_rounding(f"prologue {prologue}, residual {residual}, {N} x {K}", y,
                                       (res + ref) if residual else ref)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernel_arithmetic_in_the_triton_interpreter():
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{here.parent}{os.pathsep}{here}"}
    subprocess.run([sys.executable, "-c", "import test_kernels; test_kernels.interpreted_checks()"], env=env,
                   check=True, cwd=here)
