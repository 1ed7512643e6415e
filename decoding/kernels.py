"""Fused matrix-vector products for decoding one sequence at a time (batch 1) on a GPU, in Triton.

A decoding step at batch 1 reads every weight once and does almost nothing else: it is a chain of matrix-vector
products (GEMVs) with small elementwise steps between them (RMSNorm, SiLU x up, residual adds). As separate kernels
those steps cost launches and round trips through memory; here each folds into the product next to it:

    norm_linear(x, norm, W)          W @ rmsnorm(x)              the attention and MLP inputs
    gated_linear(gate_up, W, res)    res + W @ (silu(gate) * up)  the MLP's down projection
    linear(x, W, res)                res + W @ x                  the attention output
    norm_qkv_rope(x, norm, W, ...)   rope(W @ rmsnorm(x))         queries out; keys and values into the cache

The last one ends a decoding step's q/k/v product with RoPE and the cache write, which were small kernels of their own
in every layer. It reads RoPE's cos and sin, and the slot, from tables by position that the cache makes once.

model.py is plain PyTorch and does not know about any of this: `use_fused_decoding(model)` swaps in a forward written
with these products (FusedBlock, FusedTransformer) for a model that decodes; generate.py, eval.py and bench.py call it.

Where the Triton kernel cannot run (on a CPU, without Triton, for more than one row, for other dtypes, or for a module
swapped in for nn.Linear) the modules run as themselves. `*_reference` is the same arithmetic on plain tensors, rounding
included: the tests compare the kernel with it on a GPU.

One program computes BLOCK_N output rows: it walks along K in BLOCK_K steps, multiplies a (BLOCK_N, BLOCK_K) tile of W
by the input's slice in fp32, and sums once at the end. RMSNorm's scale needs all of x first: each program reads x once
for it (K values from L2, next to the N x K weight bytes it streams). Tile sizes are fixed per shape and per GPU
(`gemv_tiles`: from tiles.json where benchmarks/bench_tiles.py swept this GPU, else rules swept on an H100).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from errors import UserError
from model import Block, Transformer, apply_rope, masked_attention, rms_norm

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # the CPU wheel of torch comes without Triton
    triton = None

NONE, RMSNORM, SWIGLU = 0, 1, 2  # the prologue applied to the input vector


# ------------------------------------------------------------------------------------------------ references
def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up, gate_up = [gate | up] along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def plus(y: Tensor, residual: Tensor | None) -> Tensor:
    """residual + y, rounded as eager rounds it (y first), or y alone."""
    return y if residual is None else residual + y


def norm_linear_reference(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    return F.linear(rms_norm(x, norm_weight, eps), weight)


def gated_linear_reference(gate_up: Tensor, weight: Tensor, residual: Tensor | None = None) -> Tensor:
    return plus(F.linear(swiglu(gate_up), weight), residual)


def linear_reference(x: Tensor, weight: Tensor, residual: Tensor | None = None) -> Tensor:
    return plus(F.linear(x, weight), residual)


def norm_qkv_rope_reference(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, rope_table, pos: Tensor,
                            k_cache: Tensor, v_cache: Tensor, slots: Tensor, n_heads: int) -> Tensor:
    """One token (1, 1, D) at position pos (1,): queries (1, H, 1, E) out; its keys and values written to the caches
    (1, G, C, E) at its slot. Tables by position: rope_table, cos and sin, (positions, E) each; slots (positions,)."""
    E, p = k_cache.shape[-1], pos[0]
    cos, sin = rope_table[0][p].float(), rope_table[1][p].float()  # (E,)

    def rope(t):  # in fp32, rounded once, as a compiled step computes it
        return apply_rope(t.float(), cos, sin).to(t.dtype)

    q, k, v = norm_linear_reference(x, norm_weight, eps, weight).view(-1, E).split(
        [n_heads, k_cache.shape[1], v_cache.shape[1]])  # (heads, E) each
    k_cache[0, :, slots[p]], v_cache[0, :, slots[p]] = rope(k), v
    return rope(q).view(1, n_heads, 1, E)


# ------------------------------------------------------------------------------------------------ the kernel
if triton is not None:
    @triton.jit
    def _rms_scale(X, K, eps, BLOCK_K: tl.constexpr):
        """RMSNorm's 1 / rms(x), from the whole of x."""
        sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
            sq += x * x
        return tl.rsqrt(tl.sum(sq, 0) / K + eps)

    @triton.jit
    def _input(X, G, K, cols, in_cols, rstd, PROLOGUE: tl.constexpr):
        """prologue(X)[cols] in fp32, rounded to the input dtype where eager rounds (the product of two 16-bit floats is
        exact in fp32, so each rounding matches eager's bf16/fp16 multiply)."""
        dtype = X.dtype.element_ty
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
        return x

    @triton.jit
    def _gemv_kernel(W, X, G, R, Y, N, K, eps, PROLOGUE: tl.constexpr, RESIDUAL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Y[n] = (R[n] +) sum_k W[n, k] * prologue(X)[k], for BLOCK_N rows n per program."""
        dtype = X.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows = rows < N
        rstd = 1.0
        if PROLOGUE == 1:
            rstd = _rms_scale(X, K, eps, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            in_cols = cols < K
            x = _input(X, G, K, cols, in_cols, rstd, PROLOGUE)
            w = tl.load(W + rows[:, None] * K + cols[None, :], mask=in_rows[:, None] & in_cols[None, :], other=0.0,
                        eviction_policy="evict_first")  # each weight is read once: keep L2 for x
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, 1)
        if RESIDUAL:  # the product is rounded first, then added, as `residual + linear(...)` in eager
            y = y.to(dtype).to(tl.float32) + tl.load(R + rows, mask=in_rows, other=0.0).to(tl.float32)
        tl.store(Y + rows, y.to(dtype), mask=in_rows)

    @triton.jit
    def _qkv_rope_kernel(W, X, G, COS, SIN, POS, Q, KC, VC, SLOTS, K, C, eps, N_HEADS, N_KV_HEADS, E: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
        """wqkv @ rmsnorm(X) for one token at position POS, then RoPE with row POS of the tables COS, SIN (positions,
        E); queries to Q (H, E), keys and values to slot SLOTS[POS] of the caches KC, VC (G, C, E). RoPE mixes element
        j of a head with element j + E/2: each program takes BLOCK_P such pairs of one head's rows, so the rotation
        happens in registers before anything is stored."""
        dtype = X.dtype.element_ty
        HALF: tl.constexpr = E // 2
        per_head = HALF // BLOCK_P  # programs per head (of queries, keys or values)
        head = tl.program_id(0) // per_head
        j = (tl.program_id(0) % per_head) * BLOCK_P + tl.arange(0, BLOCK_P)  # (P,) within the first half
        lo = head * E + j  # wqkv's rows: [queries | keys | values], head after head
        hi = lo + HALF
        rstd = _rms_scale(X, K, eps, BLOCK_K)
        acc_lo = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
        acc_hi = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            in_cols = cols < K
            x = _input(X, G, K, cols, in_cols, rstd, 1)[None, :]
            w_lo = tl.load(W + lo[:, None] * K + cols[None, :], mask=in_cols[None, :], other=0.0,
                           eviction_policy="evict_first")
            w_hi = tl.load(W + hi[:, None] * K + cols[None, :], mask=in_cols[None, :], other=0.0,
                           eviction_policy="evict_first")
            acc_lo += w_lo.to(tl.float32) * x
            acc_hi += w_hi.to(tl.float32) * x
        a = tl.sum(acc_lo, 1).to(dtype).to(tl.float32)  # rounded as the product's output is
        b = tl.sum(acc_hi, 1).to(dtype).to(tl.float32)
        if head < N_HEADS + N_KV_HEADS:  # queries and keys: x * cos + [-x2 | x1] * sin, rounded once
            row = tl.load(POS).to(tl.int64) * E + j
            cos_lo, cos_hi = tl.load(COS + row).to(tl.float32), tl.load(COS + row + HALF).to(tl.float32)
            sin_lo, sin_hi = tl.load(SIN + row).to(tl.float32), tl.load(SIN + row + HALF).to(tl.float32)
            a, b = a * cos_lo - b * sin_lo, b * cos_hi + a * sin_hi
        if head < N_HEADS:
            tl.store(Q + lo, a.to(dtype))
            tl.store(Q + hi, b.to(dtype))
        else:
            slot = tl.load(SLOTS + tl.load(POS)).to(tl.int64)
            is_key = head < N_HEADS + N_KV_HEADS
            g = tl.where(is_key, head - N_HEADS, head - N_HEADS - N_KV_HEADS).to(tl.int64)
            at = (g * C + slot) * E + j
            if is_key:
                tl.store(KC + at, a.to(dtype))
                tl.store(KC + at + HALF, b.to(dtype))
            else:
                tl.store(VC + at, a.to(dtype))
                tl.store(VC + at + HALF, b.to(dtype))

    @triton_op("longgen::gemv", mutates_args=())
    def _gemv(x: Tensor, weight: Tensor, norm_weight: Tensor, residual: Tensor, eps: float, prologue: int,
              use_residual: bool) -> Tensor:
        N, K = weight.shape
        return launch_gemv(x, weight, norm_weight, residual, eps, prologue, use_residual,
                           gemv_tiles(N, K, device_key(x.device)), wrap_triton)

    def launch_gemv(x, weight, norm_weight, residual, eps, prologue, use_residual, tiles, wrap=lambda kernel: kernel):
        """_gemv_kernel with these tiles (rows per program, K step, warps, stages or None for Triton's default):
        the op above, and benchmarks/bench_tiles.py's sweep."""
        N, K = weight.shape
        x, weight, norm_weight, residual = (t.contiguous() for t in (x, weight, norm_weight, residual))
        y = torch.empty((*x.shape[:-1], N), device=x.device, dtype=x.dtype)
        block_n, block_k, warps, stages = tiles
        wrap(_gemv_kernel)[(triton.cdiv(N, block_n),)](
            weight, x, norm_weight, residual, y, N, K, eps, PROLOGUE=prologue, RESIDUAL=use_residual,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **({} if stages is None else {"num_stages": stages}))
        return y

    @triton_op("longgen::norm_qkv_rope", mutates_args={"k_cache", "v_cache"})
    def _norm_qkv_rope(x: Tensor, weight: Tensor, norm_weight: Tensor, eps: float, cos: Tensor, sin: Tensor,
                       pos: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, n_heads: int) -> Tensor:
        tiles = rope_tiles(k_cache.shape[-1], weight.shape[1], device_key(x.device))
        return launch_norm_qkv_rope(x, weight, norm_weight, eps, cos, sin, pos, k_cache, v_cache, slots, n_heads,
                                    tiles, wrap_triton)

    def launch_norm_qkv_rope(x, weight, norm_weight, eps, cos, sin, pos, k_cache, v_cache, slots, n_heads, tiles,
                             wrap=lambda kernel: kernel):
        """_qkv_rope_kernel with these tiles (row pairs per program, K step, warps, stages): the op above, and
        benchmarks/bench_tiles.py's sweep."""
        _, G, C, E = k_cache.shape
        K = weight.shape[1]
        q = torch.empty((1, n_heads, 1, E), device=x.device, dtype=x.dtype)
        block_p, block_k, warps, stages = tiles
        wrap(_qkv_rope_kernel)[((n_heads + 2 * G) * (E // 2) // block_p,)](
            weight, x, norm_weight, cos, sin, pos, q, k_cache, v_cache, slots, K, C, eps, n_heads, G, E=E,
            BLOCK_P=block_p, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
        return q


# ------------------------------------------------------------------------------------------------ tiles per GPU
# The kernels' tiles, and flex's kernel options for a sparse layer's first prefill chunk, come from tiles.json: one
# entry per GPU model, written by benchmarks/bench_tiles.py's sweep on that GPU and read here at run time. A GPU
# without an entry (and a shape without one) takes the rules below, the winners of a sweep on an H100.
TILES_PATH = Path(__file__).with_name("tiles.json")


def device_key(device) -> str:
    """tiles.json's key for a GPU: its name and compute capability, e.g. 'NVIDIA H200 (sm_90)'. '' off a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return ""
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} (sm_{props.major}{props.minor})"


@functools.lru_cache(maxsize=None)
def tuned(key: str) -> dict:
    """This GPU's entry of tiles.json ({} when it has none)."""
    if not key or not TILES_PATH.exists():
        return {}
    try:
        return json.loads(TILES_PATH.read_text()).get(key, {})
    except json.JSONDecodeError:
        raise UserError(f"{TILES_PATH} is not valid JSON; restore it from git or run `python -m "
                        "benchmarks.bench_tiles` again.") from None


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def gemv_tiles(N: int, K: int, key: str = "") -> tuple[int, int, int, int | None]:
    """Rows per program, the K step, warps and pipeline stages (None: Triton's default) of the N x K product: this
    GPU's swept tiles, else the H100 rules. Two rows per program give the memory system many independent streams. A
    short N (the 4096 rows of wo and w2) makes few programs: each then takes longer K steps with 8 warps, and w2's long
    K more rows."""
    if (tiles := tuned(key).get("gemv", {}).get(f"{N}x{K}")) is not None:
        return tuple(tiles)
    if N <= 4096:
        return (8 if K > 8192 else 2), min(2048, _next_power_of_2(K)), 8, None
    return 2, min(1024, _next_power_of_2(K)), 4, None


def rope_tiles(E: int, K: int, key: str = "") -> tuple[int, int, int, int]:
    """Row pairs per program (a divisor of E / 2), the K step, warps and pipeline stages for norm_qkv_rope: this GPU's
    swept tiles, else the winner of 36 tilings on an H100 at Llama-2-7B's shape
    (docs/measurements/benchL_ropetiles_h100.json): 38.2 us, 88% of copy; the plain product of the same rows takes
    37.2 us."""
    if (tiles := tuned(key).get("norm_qkv_rope", {}).get(f"{E}x{K}")) is not None:
        return tuple(tiles)
    return 1, min(512, _next_power_of_2(K)), 4, 1


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
        return plus(layer(swiglu(gate_up)), residual)
    return _gemv(gate_up, layer.weight, gate_up, gate_up if residual is None else residual, 0.0, SWIGLU,
                 residual is not None)


def rope_fusable(x: Tensor, norm: nn.Module, layer: nn.Module, rope_table: tuple[Tensor, Tensor],
                 k_cache: Tensor) -> bool:
    """Whether norm_qkv_rope's kernel takes this decoding step: one token of one sequence, as for the products, with
    contiguous caches and RoPE tables of its dtype."""
    return (_plain(layer) and fused_ok(x, layer.weight, norm.weight, k_cache, *rope_table) and k_cache.shape[0] == 1
            and all(t.is_contiguous() for t in (k_cache, *rope_table)) and k_cache.shape[-1] % 2 == 0
            and rope_table[0].shape[-1] == k_cache.shape[-1])


def norm_qkv_rope(x: Tensor, norm: nn.Module, layer: nn.Module, rope_table: tuple[Tensor, Tensor], pos: Tensor,
                  k_cache: Tensor, v_cache: Tensor, slots: Tensor, n_heads: int) -> Tensor:
    """One token (1, 1, D) of one sequence at position pos (1,): rmsnorm, wqkv, RoPE on queries and keys, and the keys
    and values written to the caches (1, G, C, E) at slot slots[pos]. Returns the queries, (1, H, 1, E).
    rope_table (cos and sin, (positions, E) each) and slots (positions,) are tables by position, made once: computed
    inside a compiled step, inductor computed them again before every layer's kernel. Only where rope_fusable() says."""
    return _norm_qkv_rope(x, layer.weight, norm.weight, norm.eps, *rope_table, pos, k_cache, v_cache, slots, n_heads)


def linear(x: Tensor, layer: nn.Module, residual: Tensor | None = None) -> Tensor:
    """(residual +) layer(x)."""
    if not (_plain(layer) and fused_ok(x, layer.weight, residual)):
        return plus(layer(x), residual)
    return _gemv(x, layer.weight, x, x if residual is None else residual, 0.0, NONE, residual is not None)


# ------------------------------------------------------------------------------------------------ the fused model
class FusedBlock(Block):
    """model.Block written with the products above: decoding one sequence on a GPU, each norm, activation and residual
    add runs inside the product next to it, and RoPE and the cache write inside the q/k/v product. Every other call
    (more than one token or sequence, a CPU, fp32) runs the same plain PyTorch operations as model.Block."""

    def forward(self, x_BTD, rope, mask, cache=None):
        attn, ffn = self.attention, self.feed_forward
        h = linear(self.attention_heads(x_BTD, rope, mask, cache), attn.wo, residual=x_BTD)
        gate_up = norm_linear(h, self.ffn_norm, ffn.w13)
        return gated_linear(gate_up, ffn.w2, residual=h)

    def attention_heads(self, x_BTD, rope, mask, cache):
        """model.Attention's forward from the block's input, with attention_norm folded into the q/k/v product, up to
        wo (which the caller folds the residual into): (B, T, H * E)."""
        attn, norm = self.attention, self.attention_norm
        B, T, _ = x_BTD.shape
        buffers = cache.decode_buffers(attn.layer_id) if cache is not None and cache.decoding else None
        if buffers is not None and rope_fusable(x_BTD, norm, attn.wqkv, cache.rope_table, buffers[0]):
            k, v, slots = buffers  # decoding one sequence on a GPU: norm, product, RoPE, cache write in one kernel
            q = norm_qkv_rope(x_BTD, norm, attn.wqkv, cache.rope_table, cache.pos, k, v, slots, attn.n_heads)
        else:
            q, k, v = attn.heads(norm_linear(x_BTD, norm, attn.wqkv), rope)
            if cache is not None:
                k, v = cache.update(attn.layer_id, k, v)  # (B, G, S, E)
        y = masked_attention(q, k, v, mask)  # (B, H, T, E)
        return y.transpose(1, 2).reshape(B, T, -1)


class FusedTransformer(Transformer):
    """model.Transformer whose last norm runs inside the output product (decoding one sequence on a GPU)."""

    def logits(self, h_BTD: Tensor) -> Tensor:
        return norm_linear(h_BTD, self.norm, self.output)


def use_fused_decoding(model: Transformer) -> Transformer:
    """Swap the fused products into a model, in place (returned for convenience): its class becomes FusedTransformer
    and its blocks' FusedBlock. Weights, state_dict and results are unchanged; decoding one sequence on a GPU in bf16 or
    fp16 runs the Triton kernels above, and every other call the plain modules, exactly as model.py does. generate.py,
    eval.py and bench.py call it on the model they decode with; `enabled = False` turns the kernels off again. A
    subclass of model.Transformer or model.Block (another forward of its own) is left as it is."""
    if type(model) is Transformer:
        model.__class__ = FusedTransformer
    for layer in model.layers:
        if type(layer) is Block:
            layer.__class__ = FusedBlock
    return model
