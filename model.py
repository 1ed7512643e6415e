"""A one-file Llama whose layers each have an attention kind: `full` (SDPA, flash on GPU) or one of LongGen's sparse
patterns, `sink_window` and `strided` (compiled FlexAttention with a BlockMask; on CPU, SDPA with a dense boolean mask
made from the same mask_mod, since flex has no backward there).

Legend for shape suffixes: B batch, T tokens in this call, S keys attended (T plus cached), D model width, H query
heads, G key/value heads, E head width, F feed-forward width, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from masks import PATTERNS, Pattern, block_mask, dense_mask, check_parameters, document_starts, make_pattern

try:  # the project's one-sentence mistakes, printed without a traceback by its command-line tools
    from errors import UserError
except ImportError:  # model.py copied on its own: a plain ValueError
    UserError = ValueError


@dataclass(frozen=True)
class RopeScaling:
    """Stretch RoPE for longer contexts. "linear": positions / factor (position interpolation). "llama3": Llama-3.1's
    frequency-dependent rule (low frequencies / factor, high ones kept, a smooth ramp between)."""

    kind: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(frozen=True)
class Config:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 0  # 0: as many as n_heads (multi-head attention); fewer: grouped-query attention
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    layer_kinds: tuple[str, ...] = ()  # each layer's attention kind (masks.PATTERNS); empty: every layer full
    # The patterns' parameters by name, in tokens; masks.py declares each pattern's with its default (the paper's:
    # sink_window n_sink=64, window=2048; strided block=64, local_blocks=16, stride=64). Unset ones take the default.
    # Read one as cfg.pattern_params["window"]; change some with cfg.with_pattern(window=4096).
    pattern_params: dict[str, int] = field(default_factory=dict)
    mask_block: int = 128  # FlexAttention BlockMask tile, in tokens (benchmarks/bench_masks.py: 128 beats 64)
    head_dim: int = field(init=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
        if self.n_kv_heads == 0:
            set_("n_kv_heads", self.n_heads)
        if not self.layer_kinds:
            set_("layer_kinds", ("full",) * self.n_layers)
        set_("layer_kinds", tuple(self.layer_kinds))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "mask_block"):
            if getattr(self, name) <= 0:
                raise UserError(f"Config value {name}={getattr(self, name)} must be a positive integer.")
        if self.mask_block % 128:
            raise UserError(f"mask_block={self.mask_block} must be a multiple of 128: FlexAttention's backward "
                            "kernel (torch 2.11-2.13) has no smaller tiles.")
        try:  # every pattern's parameters, used here or not
            set_("pattern_params", check_parameters(self.pattern_params))
        except ValueError as e:
            raise UserError(f"Config: {e}.") from None
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}.")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise UserError(f"dim={self.dim} must split into n_heads={self.n_heads} heads of even width.")
        if self.rope_scaling is not None and (self.rope_scaling.kind not in ("linear", "llama3")
                                              or self.rope_scaling.factor <= 0):
            raise UserError(f"rope_scaling must be of kind 'linear' or 'llama3' with factor > 0, "
                            f"not {self.rope_scaling}.")
        if len(self.layer_kinds) != self.n_layers or not set(self.layer_kinds) <= set(PATTERNS):
            raise UserError(f"layer_kinds must name one of {', '.join(PATTERNS)} for each of the {self.n_layers} "
                            "layers.")
        set_("head_dim", self.dim // self.n_heads)

    def weight_shapes(self) -> tuple:
        """What the weights' shapes depend on: configs that agree here can share one set of weights."""
        return (self.vocab_size, self.dim, self.n_layers, self.n_heads, self.n_kv_heads, self.ffn_dim,
                self.tie_embeddings)

    def pattern(self, kind: str) -> Pattern:
        """The attention kind's pattern (masks.py), with this config's parameters."""
        return make_pattern(kind, **self.pattern_params)

    def with_pattern(self, **params) -> Config:
        """The same config with these pattern parameters changed (e.g. window=4096)."""
        return replace(self, pattern_params={**self.pattern_params, **params})


PRESETS = {
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                         rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=4096),
    "llama-2-70b": dict(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                        max_seq_len=4096),
    "llama-3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       rope_theta=500000.0, max_seq_len=8192),
    # For tests: small enough for CPU, patterns short enough that a few hundred tokens cross every boundary.
    "tiny": dict(vocab_size=512, dim=64, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=1024,
                 pattern_params=dict(n_sink=4, window=24, block=8, local_blocks=2, stride=4)),
}


def preset(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise UserError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    params = {**PRESETS[name].get("pattern_params", {}), **overrides.pop("pattern_params", {})}
    return Config(**{**PRESETS[name], **overrides, "pattern_params": params})


# ------------------------------------------------------------------------------------------------ building blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as Llama computes it: the scale in fp32, rounded to x's dtype, then times the weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_frequencies(cfg: Config, device=None) -> Tensor:
    """(E/2,) inverse frequencies, with the config's scaling rule applied."""
    E = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, E, 2, device=device, dtype=torch.float32) / E)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.kind == "linear":
        return inv_freq / s.factor
    # llama3: wavelengths longer than original/low_freq_factor are stretched, shorter than original/high_freq_factor
    # kept, and those between interpolated.
    wavelen = 2 * math.pi / inv_freq
    ramp = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - ramp) * inv_freq / s.factor + ramp * inv_freq
    stretched = torch.where(wavelen > s.original_max_seq_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    medium = (wavelen >= s.original_max_seq_len / s.high_freq_factor) & (
        wavelen <= s.original_max_seq_len / s.low_freq_factor)
    return torch.where(medium, smoothed, stretched)


def rope_angles(inv_freq: Tensor, positions: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """positions (T,) or (B, T) -> cos, sin of shape (1 or B, 1, T, E), half-split layout (as in HF Llama)."""
    freqs = positions.float()[..., None] * inv_freq  # (..., T, E/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, E)
    emb = emb.view(-1, 1, *emb.shape[-2:])  # (1 or B, 1, T, E)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# One compiled flex serves every mask: parameters are tensors, so new masks do not recompile. Made at import (which
# changes no setting: torch.compile is lazy), since a wrapper first made while dynamo traces a caller runs eagerly.
_compiled_flex = torch.compile(flex_attention)


def compile_settings() -> None:
    """The compiler settings that compiled flex needs, set by the entry points (train.py, generate.py, eval.py, the
    benchmarks) rather than on import. A second sequence length makes lengths dynamic, but each attention kind, key
    layout and grad mode is still a graph of its own: allow 32 of them, and fail loudly past that instead of silently
    running flex unfused (which materialises the whole score matrix)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def compiled_flex_attention(q, k, v, block_mask: BlockMask):
    """Compiled FlexAttention (uncompiled flex materialises the whole score matrix); see compile_settings()."""
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def masked_attention(q_BHTE, k_BGSE, v_BGSE, mask) -> Tensor:
    """Attention under a mask of any form. mask: None = causal over equal lengths (SDPA flash), a BlockMask (flex), a
    (B, 1, T, S) bool tensor (SDPA), or an object with `exchange_and_attend` (context_parallel.CPAttention: fetches
    other ranks' keys, then attends)."""
    if hasattr(mask, "exchange_and_attend"):
        return mask.exchange_and_attend(q_BHTE, k_BGSE, v_BGSE)
    if mask is None:
        return F.scaled_dot_product_attention(q_BHTE, k_BGSE, v_BGSE, is_causal=True, enable_gqa=True)
    if isinstance(mask, BlockMask):
        return compiled_flex_attention(q_BHTE, k_BGSE, v_BGSE, mask)
    return F.scaled_dot_product_attention(q_BHTE, k_BGSE, v_BGSE, attn_mask=mask, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v in one matrix: decoding reads it in one large product instead of three small ones (faster)
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_BTD, rope, mask, cache=None):
        """The q/k/v product, RoPE, the attention (writing and reading the cache, if any), and wo: (B, T, D)."""
        q, k, v = self.qkv(x_BTD, rope)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # (B, G, S, E)
        return self.out(masked_attention(q, k, v, mask))

    def qkv(self, x_BTD, rope):
        """The queries (B, H, T, E), keys and values (B, G, T, E) of these tokens, after RoPE. Also used by the
        post-hoc KV baselines (evaluation/kv_policies.py), which attend on their own."""
        return self.heads(self.wqkv(x_BTD), rope)

    def heads(self, qkv_BTF, rope):
        """wqkv's output split into queries, keys and values per head, RoPE applied (kernels.FusedBlock computes the
        product its own way, then calls this)."""
        B, T, _ = qkv_BTF.shape
        H, G, E = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = qkv_BTF.split([H * E, G * E, G * E], dim=-1)
        q = q.view(B, T, H, E).transpose(1, 2)  # (B, H, T, E)
        k = k.view(B, T, G, E).transpose(1, 2)  # (B, G, T, E)
        v = v.view(B, T, G, E).transpose(1, 2)  # (B, G, T, E)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def out(self, y_BHTE):
        """The heads' outputs (B, H, T, E) concatenated and projected by wo: (B, T, D)."""
        B, H, T, E = y_BHTE.shape
        return self.wo(y_BHTE.transpose(1, 2).reshape(B, T, H * E))


class FeedForward(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # gate and up in one matrix
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x_BTD, rope, mask, cache=None):
        return self.after_attention(x_BTD, self.attention(self.attention_norm(x_BTD), rope, mask, cache))

    def after_attention(self, x_BTD, attn_BTD):
        """The rest of the block once attention's output (after wo) is known: residual, feed-forward, residual."""
        h = x_BTD + attn_BTD
        return h + self.feed_forward(self.ffn_norm(h))


# ------------------------------------------------------------------------------------------------ the model
class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.use_flex: bool | None = None  # None: decided per call by flex_for()

    def flex_for(self, T: int, device, decoding: bool = False) -> bool:
        """Flex runs on GPU for decoding steps and for calls of at least one mask tile; short prefill chunks take
        SDPA with a small dense (T, S) mask, and so does the CPU, where flex has no backward. `use_flex` overrides."""
        if self.use_flex is not None:
            return self.use_flex
        return torch.device(device).type == "cuda" and (decoding or T >= self.cfg.mask_block)

    def masks(self, T: int, doc_ids=None, batch: int = 1, device=None) -> dict:
        """One mask per attention kind, for a whole sequence of T tokens, shared by every layer of that kind. None
        (SDPA's causal flash kernel) for full layers, and for sparse ones when T is within their reach (Pattern.reach:
        every causal pair is allowed there)."""
        use_flex, masks = self.flex_for(T, device), {}
        for kind in set(self.cfg.layer_kinds):
            pattern = self.cfg.pattern(kind)
            if doc_ids is None and T <= pattern.reach():
                masks[kind] = None  # every causal pair allowed (Pattern.reach): SDPA's own flash path
            elif use_flex:
                masks[kind] = block_mask(pattern, T, T, batch=batch, doc_ids=doc_ids, block_size=self.cfg.mask_block,
                                         device=device)
            else:
                masks[kind] = dense_mask(pattern, T, T, batch=batch, doc_ids=doc_ids, device=device)
        return masks

    def forward(self, tokens_BT: Tensor, *, doc_ids: Tensor | None = None, cache=None,
                logits_at: Tensor | None = None, positions: Tensor | None = None, masks: dict | None = None,
                targets: Tensor | None = None, loss_chunk: int = 4096) -> Tensor:
        """tokens (B, T) -> logits (B, T, V).
        doc_ids (B, T), for packed training sequences: each document is attended to, and positioned, on its own.
        cache (cache.Cache): the tokens continue the cached sequences; the cache is read and updated.
        logits_at (B,): only the logits at this index of each row, (B, 1, V).
        positions (T,) or (B, T) and masks (one per kind), given together: the tokens' RoPE positions and attention,
        decided by the caller (context_parallel.cp_forward: a shard of a longer sequence).
        targets (B, T), for training: instead of logits, the summed cross-entropy against them (-100 ignored), made
        loss_chunk tokens at a time (chunked_cross_entropy)."""
        B, T = tokens_BT.shape
        device = tokens_BT.device
        if cache is not None:
            positions, masks = cache.prepare(T, self.flex_for(T, device, cache.decoding))  # (T,) or (B, 1)
        elif masks is None:
            if T > self.cfg.max_seq_len:
                raise UserError(f"{T} tokens exceed the model's max_seq_len={self.cfg.max_seq_len}; shorten the "
                                "input or raise max_seq_len.")
            positions = torch.arange(T, device=device)
            if doc_ids is not None:
                positions = positions - document_starts(doc_ids)  # (B, T), restart with every document
            masks = self.masks(T, doc_ids, B, device)
        h = self.tok_embeddings(tokens_BT)  # (B, T, D)
        rope = rope_angles(rope_frequencies(self.cfg, device), positions, h.dtype)
        for layer, kind in zip(self.layers, self.cfg.layer_kinds):
            h = layer(h, rope, masks[kind], cache)
        if cache is not None:
            cache.advance(T)
        if logits_at is not None:
            h = h[torch.arange(B, device=device), logits_at][:, None]  # (B, 1, D)
        if targets is not None:
            return chunked_cross_entropy(self.norm(h), self.output, targets, loss_chunk)
        return self.logits(h)  # (B, T, V)

    def logits(self, h_BTD: Tensor) -> Tensor:
        """The last norm and the output layer: (B, T, D) -> (B, T, V)."""
        return self.output(self.norm(h_BTD))


def chunked_cross_entropy(h_BTD: Tensor, output: nn.Module, targets_BT: Tensor, chunk: int) -> Tensor:
    """Summed cross-entropy of output(h) against targets (-100 ignored), without ever holding the (B, T, V) logits:
    each chunk of tokens makes its logits, its loss, and drops them; the backward pass makes them again. At 128K tokens
    and 32,000 words the logits in bf16 plus their fp32 copy are 23 GiB; a 4,096-token chunk holds 0.7 GiB, for one
    more pass of the output layer. chunk=0: all at once."""
    def piece(h, t):
        return F.cross_entropy(output(h).flatten(0, 1).float(), t.flatten(), ignore_index=-100, reduction="sum")

    T = h_BTD.shape[1]
    if not chunk or chunk >= T:
        return piece(h_BTD, targets_BT)
    return sum(checkpoint(piece, h_BTD[:, i:i + chunk], targets_BT[:, i:i + chunk], use_reentrant=False)
               for i in range(0, T, chunk))


def build(cfg: Config, state_dict: dict[str, Tensor] | None = None, *, device=None, dtype=None) -> Transformer:
    """Make the model on the meta device, then load the weights by assignment (no copy, no double memory). Without
    weights it is randomly initialised, directly on `device` in `dtype` (for training from scratch and tests)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if state_dict is None:
        model = model.to(dtype=dtype or torch.float32).to_empty(device=device or "cpu")
        init_weights(model)
    else:
        state_dict = dict(state_dict)
        if cfg.tie_embeddings:
            state_dict.setdefault("output.weight", state_dict["tok_embeddings.weight"])
        model.load_state_dict(state_dict, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assignment and to_empty untie them
    return model.to(device=device, dtype=dtype)


def init_weights(model: Transformer, std: float = 0.02) -> None:
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, std=std)
