"""Fused matrix-vector products for decoding one sequence at a time (batch 1) on a GPU, in Triton.

A decoding step at batch 1 reads every weight once and does almost nothing else: it is a chain of matrix-vector
products (GEMVs) with small elementwise steps between them (RMSNorm, SiLU x up, residual adds). As separate kernels
those steps cost launches and round trips through memory; here each folds into the product next to it:

    norm_linear(x, norm, W)          W @ rmsnorm(x)              the attention and MLP inputs
    gated_linear(gate_up, W, res)    res + W @ (silu(gate) * up)  the MLP's down projection
    linear(x, W, res)                res + W @ x                  the attention output

Where the Triton kernel cannot run (on a CPU, without Triton, for more than one row, for other dtypes, or for a module
swapped in for nn.Linear) the modules run as themselves. `*_reference` is the same arithmetic on plain tensors, rounding
included: the tests compare the kernel with it on a GPU.

One program computes BLOCK_N output rows: it walks along K in BLOCK_K steps, multiplies a (BLOCK_N, BLOCK_K) tile of W
by the input's slice in fp32, and sums once at the end. RMSNorm's scale needs all of x first: each program reads x once
for it (K values from L2, next to the N x K weight bytes it streams). Tile sizes are fixed per shape (`_tiles`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # the CPU wheel of torch comes without Triton
    triton = None

NONE, RMSNORM, SWIGLU = 0, 1, 2  # the prologue applied to the input vector


# ------------------------------------------------------------------------------------------------ references
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as Llama computes it: the scale in fp32, rounded to x's dtype, then times the weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def norm_linear_reference(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    return F.linear(rms_norm(x, norm_weight, eps), weight)


def gated_linear_reference(gate_up: Tensor, weight: Tensor, residual: Tensor | None = None) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    y = F.linear(F.silu(gate) * up, weight)
    return y if residual is None else residual + y


def linear_reference(x: Tensor, weight: Tensor, residual: Tensor | None = None) -> Tensor:
    y = F.linear(x, weight)
    return y if residual is None else residual + y


# ------------------------------------------------------------------------------------------------ the kernel
if triton is not None:
    @triton.jit
    def _gemv_kernel(W, X, G, R, Y, N, K, eps, PROLOGUE: tl.constexpr, RESIDUAL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Y[n] = (R[n] +) sum_k W[n, k] * prologue(X)[k], for BLOCK_N rows n per program."""
        dtype = X.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows = rows < N
        if PROLOGUE == 1:  # RMSNorm's scale, from the whole of x
            sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
                sq += x * x
            rstd = tl.rsqrt(tl.sum(sq, 0) / K + eps)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            in_cols = cols < K
            # Arithmetic in fp32, rounded to the input dtype where eager rounds (the product of two 16-bit floats is
            # exact in fp32, so each rounding matches eager's bf16/fp16 multiply).
            if PROLOGUE == 1:  # RMSNorm: (x * rstd), rounded, times the norm's weight, rounded
                x = tl.load(X + cols, mask=in_cols, other=0.0).to(tl.float32)
                x = (x * rstd).to(dtype).to(tl.float32)
                x = (x * tl.load(G + cols, mask=in_cols, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            elif PROLOGUE == 2:  # X holds [gate | up]: silu(gate), rounded, times up, rounded
                gate = tl.load(X + cols, mask=in_cols, other=0.0).to(tl.float32)
                up = tl.load(X + K + cols, mask=in_cols, other=0.0).to(tl.float32)
                x = ((gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up).to(dtype).to(tl.float32)
            else:
                x = tl.load(X + cols, mask=in_cols, other=0.0).to(tl.float32)
            w = tl.load(W + rows[:, None] * K + cols[None, :], mask=in_rows[:, None] & in_cols[None, :], other=0.0,
                        eviction_policy="evict_first")  # each weight is read once: keep L2 for x
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, 1)
        if RESIDUAL:  # the product is rounded first, then added, as `residual + linear(...)` in eager
            y = y.to(dtype).to(tl.float32) + tl.load(R + rows, mask=in_rows, other=0.0).to(tl.float32)
        tl.store(Y + rows, y.to(dtype), mask=in_rows)

    def _tiles(N: int, K: int) -> tuple[int, int, int]:
        """Rows per program, the K step and warps per program. Two rows per program give the memory system many
        independent streams. A short N (the 4096 rows of wo and w2) makes few programs: each then takes longer K steps
        with 8 warps, and w2's long K more rows. Winners of a sweep on an H100, weights read from memory."""
        if N <= 4096:
            return (8 if K > 8192 else 2), min(2048, triton.next_power_of_2(K)), 8
        return 2, min(1024, triton.next_power_of_2(K)), 4

    @triton_op("longgen::gemv", mutates_args=())
    def _gemv(x: Tensor, weight: Tensor, norm_weight: Tensor, residual: Tensor, eps: float, prologue: int,
              use_residual: bool) -> Tensor:
        N, K = weight.shape
        x, weight, norm_weight, residual = (t.contiguous() for t in (x, weight, norm_weight, residual))
        y = torch.empty((*x.shape[:-1], N), device=x.device, dtype=x.dtype)
        block_n, block_k, warps = _tiles(N, K)
        wrap_triton(_gemv_kernel)[(triton.cdiv(N, block_n),)](
            weight, x, norm_weight, residual, y, N, K, eps, PROLOGUE=prologue, RESIDUAL=use_residual,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
        return y

    # -------------------------------------------------------------------------------------------- decode attention
    @triton.jit
    def _attention_split_kernel(Q, K, V, M, O_part, LSE_part, S, split_len, scale,
                                stride_qb, stride_qh, stride_kb, stride_kg, stride_ks, stride_vb, stride_vg, stride_vs,
                                stride_mb, G: tl.constexpr, REP: tl.constexpr, REP_PAD: tl.constexpr,
                                E: tl.constexpr, BLOCK_S: tl.constexpr):
        """One key/value head of one row, one split of the slots: softmax-weighted values of its slots for the REP
        query heads that share the head, unnormalised by the other splits (partial output and its log-sum-exp)."""
        bg, split = tl.program_id(0), tl.program_id(1)
        b, g = bg // G, bg % G
        r = tl.arange(0, REP_PAD)
        heads, e = g * REP + r, tl.arange(0, E)
        # Products in fp32 (TF32 on the tensor cores, exact for 16-bit inputs); Triton's interpreter needs it too.
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + e[None, :], mask=(r < REP)[:, None],
                    other=0.0).to(tl.float32)
        m_i = tl.full((REP_PAD,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((REP_PAD,), dtype=tl.float32)
        acc = tl.zeros((REP_PAD, E), dtype=tl.float32)
        start = split * split_len
        for s0 in range(start, tl.minimum(start + split_len, S), BLOCK_S):
            slots = s0 + tl.arange(0, BLOCK_S)
            in_s = slots < S
            allowed = tl.load(M + b * stride_mb + slots, mask=in_s, other=0) != 0
            k = tl.load(K + b * stride_kb + g * stride_kg + slots[:, None] * stride_ks + e[None, :],
                        mask=in_s[:, None], other=0.0).to(tl.float32)
            scores = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)  # (REP_PAD, BLOCK_S); compiled, scale is fp64
            scores = tl.where(allowed[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no slot allowed yet: keep zeros, not NaNs
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            v = tl.load(V + b * stride_vb + g * stride_vg + slots[:, None] * stride_vs + e[None, :],
                        mask=in_s[:, None], other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            # p rounded to the values' dtype, as SDPA's kernels do
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
            m_i = m_new
        n_splits = tl.num_programs(1)
        part = (b * G * REP + heads) * n_splits + split  # (B, H, splits) flattened
        has = l_i > 0
        tl.store(O_part + part[:, None] * E + e[None, :], acc / tl.where(has, l_i, 1.0)[:, None],
                 mask=(r < REP)[:, None])
        tl.store(LSE_part + part, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")), mask=r < REP)

    @triton.jit
    def _attention_combine_kernel(O_part, LSE_part, O, n_splits, E: tl.constexpr, SPLITS_PAD: tl.constexpr):
        """One query head of one row: the splits' partial outputs, weighted by their share of the softmax."""
        bh = tl.program_id(0)
        sp, e = tl.arange(0, SPLITS_PAD), tl.arange(0, E)
        lse = tl.load(LSE_part + bh * n_splits + sp, mask=sp < n_splits, other=float("-inf"))
        w = tl.exp(lse - tl.max(lse, 0))
        o = tl.load(O_part + (bh * n_splits + sp)[:, None] * E + e[None, :], mask=(sp < n_splits)[:, None], other=0.0)
        out = tl.sum(o * (w / tl.sum(w, 0))[:, None], 0)
        tl.store(O + bh * E + e, out.to(O.dtype.element_ty))

    def _split_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, programs: int, wrap=wrap_triton,
                         block_s: int = 64) -> Tensor:
        """The two kernels, with about `programs` programs splitting the slots (each split whole key tiles)."""
        B, H, _, E = q.shape
        G, S = k.shape[1], k.shape[2]
        n_splits = max(1, min(triton.cdiv(S, block_s), triton.cdiv(programs, B * G)))
        split_len = triton.cdiv(triton.cdiv(S, n_splits), block_s) * block_s
        n_splits = triton.cdiv(S, split_len)
        o_part = torch.empty((B, H, n_splits, E), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((B, H, n_splits), device=q.device, dtype=torch.float32)
        mask = mask.reshape(B, S)
        wrap(_attention_split_kernel)[(B * G, n_splits)](
            q, k, v, mask, o_part, lse_part, S, split_len, E**-0.5, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), mask.stride(0), G=G, REP=H // G,
            REP_PAD=max(16, triton.next_power_of_2(H // G)), E=E, BLOCK_S=block_s, num_warps=4)
        out = torch.empty((B, H, 1, E), device=q.device, dtype=q.dtype)
        wrap(_attention_combine_kernel)[(B * H,)](o_part, lse_part, out, n_splits, E=E,
                                                  SPLITS_PAD=triton.next_power_of_2(n_splits), num_warps=4)
        return out

    @triton_op("longgen::decode_attention", mutates_args=())
    def _decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        # about 4 programs per SM: every SM reads a share of the cache
        return _split_attention(q, k, v, mask, 4 * torch.cuda.get_device_properties(q.device).multi_processor_count)


enabled = True  # False: the modules always run as themselves (bench.py --decode-kernels plain measures the difference)


def fused_ok(x: Tensor, weight: Tensor, *others: Tensor | None) -> bool:
    """Whether the Triton kernel takes this call: one row, on a GPU, 16-bit, every tensor of one dtype."""
    return (enabled and triton is not None and x.is_cuda and x.numel() == x.shape[-1]
            and x.dtype in (torch.bfloat16, torch.float16)
            and all(t is None or t.dtype == x.dtype for t in (weight, *others)))


# ------------------------------------------------------------------------------------------------ the entry points
# They take the modules (model.py's RMSNorm, nn.Linear). Where the kernel does not run, each module runs as itself, so a
# module swapped in for an nn.Linear (torchao's Float8Linear in float8 training) takes effect; the kernel only ever
# replaces a plain nn.Linear.
def _plain(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and layer.bias is None


def norm_linear(x: Tensor, norm: nn.Module, layer: nn.Module) -> Tensor:
    """layer(norm(x)) for an RMSNorm `norm` (weight, eps): RMSNorm folded into the product's input."""
    if not (_plain(layer) and fused_ok(x, layer.weight, norm.weight)):
        return layer(norm(x))
    return _gemv(x, layer.weight, norm.weight, x, norm.eps, RMSNORM, False)


def gated_linear(gate_up: Tensor, layer: nn.Module, residual: Tensor | None = None) -> Tensor:
    """(residual +) layer(silu(gate) * up), gate_up = [gate | up] along the last dimension."""
    if not (_plain(layer) and fused_ok(gate_up, layer.weight, residual)):
        gate, up = gate_up.chunk(2, dim=-1)
        y = layer(F.silu(gate) * up)
        return y if residual is None else residual + y
    return _gemv(gate_up, layer.weight, gate_up, gate_up if residual is None else residual, 0.0, SWIGLU,
                 residual is not None)


def linear(x: Tensor, layer: nn.Module, residual: Tensor | None = None) -> Tensor:
    """(residual +) layer(x)."""
    if not (_plain(layer) and fused_ok(x, layer.weight, residual)):
        y = layer(x)
        return y if residual is None else residual + y
    return _gemv(x, layer.weight, x, x if residual is None else residual, 0.0, NONE, residual is not None)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def attention_ok(q: Tensor, k: Tensor, v: Tensor, mask) -> bool:
    """Whether the Triton kernel takes this attention: one query per row on a GPU, 16-bit, a boolean (B, 1, 1, S)
    mask over the slots, a power-of-2 head size, and whole groups of query heads per key/value head."""
    B, H, T, E = q.shape
    return (enabled and triton is not None and q.is_cuda and T == 1 and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == v.dtype == q.dtype and isinstance(mask, Tensor) and mask.dtype == torch.bool
            and mask.shape == (B, 1, 1, k.shape[2]) and mask.stride(-1) == 1 and 16 <= E <= 256 and not E & (E - 1)
            and k.stride(-1) == v.stride(-1) == q.stride(-1) == 1 and H % k.shape[1] == 0)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(E), where mask) v for q (B, H, T, E), k and v (B, G, S, E), mask (B, 1, T, S) boolean.
    One query per row on a GPU: split over the slots (flash-decoding), so that every SM reads a share of the cache,
    then the splits are combined by their log-sum-exp; otherwise SDPA."""
    if not attention_ok(q, k, v, mask):
        return attention_reference(q, k, v, mask)
    return _decode_attention(q, k, v, mask)
