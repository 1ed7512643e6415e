"""LongGen's attention patterns, as FlexAttention mask_mods and as block masks built at block level.

The paper (LongGen, ICLR 2025) keeps full attention in the middle third of the layers and gives every other layer one of
two static, block-aligned sparse patterns (kernel block = 64 tokens):

  * sink + window ("AttnSink"): the first block (64 sink tokens) and the most recent 32 blocks (2,048 tokens);
  * strided blocks ("BlockSparse"): a few local blocks plus every 64th block.

Each pattern below is a mask_mod factory whose docstring states the exact inequality, with its parameters captured as
tensors so that changing a value never recompiles a kernel. Beside each one is its *block rule*: for a rectangle of
query positions [q_lo, q_hi] x key positions [k_lo, k_hi] it answers "is any pair allowed?" and "are all pairs
allowed?" in closed form. `block_mask` uses those rules to build a BlockMask straight from the block grid, which at 128K
tokens takes milliseconds, where `create_block_mask` evaluates all S x S pairs (seconds; BENCHMARKS.md).

Each attention kind is one class (`Full`, `SinkWindow`, `Strided`, registered in PATTERNS by its kind name): its
dataclass fields are the pattern's parameters, declared only there, and its methods give the mask_mod, the block rule,
the pair count, the reach, and what the KV cache (capacity, slot_of) and context parallelism (lookback, far_rows)
need. A new pattern is one more such class, decorated with @register (tests/test_new_pattern.py adds a toy one).

Positions are logical token positions. Packed documents (`document`) and chunked prefill (`q_offset`) only change which
positions the physical indices stand for.

Legend: B batch, Q query tokens, K key tokens, NQ / NK query / key blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_mask

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (b, h, q_idx, kv_idx) -> bool

# Captured parameters are int32 like flex's own indices: int64 arithmetic (`//`, `%`) is slow on a GPU, and int32
# tensors run as fast as compile-time constants without recompiling when a value changes (see BENCHMARKS.md).
_INDEX = torch.int32


def _param(value: int, device) -> Tensor:
    return torch.tensor(value, device=device, dtype=_INDEX)

# ------------------------------------------------------------------------------------------------ the patterns
def causal() -> MaskMod:
    """Full causal attention: query q sees key k iff k <= q."""

    def causal_mask(b, h, q, k):
        return k <= q

    return causal_mask


def sink_window(n_sink: int, window: int, device=None) -> MaskMod:
    """Sink + window: query q sees key k iff k <= q and (k < n_sink or q - k < window).

    The first `n_sink` tokens stay visible forever; otherwise a query sees itself and the `window - 1` tokens before it.
    Paper: n_sink = 64 (one block), window = 2048 (32 blocks).
    """
    n_sink_t, window_t = _param(n_sink, device), _param(window, device)

    def sink_window_mask(b, h, q, k):
        return (k <= q) & ((k < n_sink_t) | (q - k < window_t))

    sink_window_mask.__name__ = f"sink_window_{n_sink}_{window}"
    return sink_window_mask


def strided(block: int, local_blocks: int, stride: int, device=None) -> MaskMod:
    """Strided blocks: with qb = q // block and kb = k // block, query q sees key k iff
    k <= q and (qb - kb < local_blocks or (kb + 1) % stride == 0).

    A query sees its own block and the `local_blocks - 1` blocks before it, plus every `stride`-th block of the past
    (blocks stride-1, 2*stride-1, ...). Paper: block = 64 tokens, stride = 64 blocks; the number of local blocks is not
    stated, we take 16 (1,024 tokens), the default of the co-authors' local-stride kernel (Phi-3-small).
    """
    block_t, local_t, stride_t = _param(block, device), _param(local_blocks, device), _param(stride, device)

    def strided_mask(b, h, q, k):
        qb, kb = q // block_t, k // block_t
        return (k <= q) & ((qb - kb < local_t) | ((kb + 1) % stride_t == 0))

    strided_mask.__name__ = f"strided_{block}_{local_blocks}_{stride}"
    return strided_mask


def document(mask_mod: MaskMod, doc_ids: Tensor) -> MaskMod:
    """Packed documents: q sees k iff they are in the same document and `mask_mod` allows them at their positions
    *within* that document, so every document gets its own sink, window and blocks, as if it were alone.

    doc_ids: (B, S) document number of every token, non-decreasing along each row.
    """
    starts = document_starts(doc_ids).to(_INDEX)  # (B, S) index of the first token of each token's document

    def document_mask(b, h, q, k):
        same_doc = doc_ids[b, q] == doc_ids[b, k]
        return same_doc & mask_mod(b, h, q - starts[b, q], k - starts[b, k])

    return document_mask


def shifted(mask_mod: MaskMod, q_offset: int, device=None) -> MaskMod:
    """Queries are the tokens q_offset, q_offset + 1, ... of the sequence (a prefill chunk): q sees k iff
    mask_mod(q + q_offset, k)."""
    offset_t = _param(q_offset, device)

    def shifted_mask(b, h, q, k):
        return mask_mod(b, h, q + offset_t, k)

    return shifted_mask


def document_starts(doc_ids: Tensor) -> Tensor:
    """(B, S) -> (B, S): for every token, the index of the first token of its document."""
    S = doc_ids.shape[-1]
    idx = torch.arange(S, device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(is_start, idx, 0).cummax(dim=-1).values


def document_ends(doc_ids: Tensor) -> Tensor:
    """(B, S) -> (B, S): for every token, the index of the last token of its document."""
    S = doc_ids.shape[-1]
    idx = torch.arange(S, device=doc_ids.device).expand_as(doc_ids)
    is_end = torch.ones_like(doc_ids, dtype=torch.bool)
    is_end[:, :-1] = doc_ids[:, :-1] != doc_ids[:, 1:]
    return torch.where(is_end, idx, S).flip(-1).cummin(dim=-1).values.flip(-1)


# ------------------------------------------------------------------------------------------------ block rules
# Each rule takes inclusive position intervals (broadcastable int64 tensors) and returns (any_allowed, all_allowed).
def causal_blocks(q_lo, q_hi, k_lo, k_hi):
    return k_lo <= q_hi, k_hi <= q_lo


def sink_window_blocks(q_lo, q_hi, k_lo, k_hi, n_sink, window):
    # Some pair is allowed if the earliest key is a sink some query can see, or if the closest causal pair
    # (distance max(q_lo - k_hi, 0)) lies inside the window.
    any_ = (k_lo <= q_hi) & ((k_lo < n_sink) | ((q_lo - k_hi).clamp(min=0) < window))
    # Every pair is allowed if all are causal and the farthest non-sink key is still inside the window of the last query.
    all_ = (k_hi <= q_lo) & ((k_hi < n_sink) | (q_hi - k_lo.clamp(min=n_sink) < window))
    return any_, all_


def strided_blocks(q_lo, q_hi, k_lo, k_hi, block, local_blocks, stride):
    kb_lo, kb_hi = k_lo // block, k_hi // block
    causal_any = k_lo <= q_hi
    # Local: the pair with the smallest block distance is the earliest query that is not before the key range,
    # with the latest key not after it.
    q_near = torch.maximum(q_lo, k_lo)
    k_near = torch.minimum(k_hi, q_near)
    local_any = q_near // block - k_near // block < local_blocks
    # Vertical: the last block b with (b + 1) % stride == 0 that holds a key no later than q_hi.
    kb_max = torch.minimum(k_hi, q_hi) // block
    vertical_any = ((kb_max + 1) // stride) * stride - 1 >= kb_lo
    any_ = causal_any & (local_any | vertical_any)
    # All: every key block is vertical, or the earliest non-vertical one is local to the last query.
    first_plain = kb_lo + ((kb_lo + 1) % stride == 0).long()  # for stride > 1, the next block is never vertical
    all_vertical = (first_plain > kb_hi) | (stride == 1)
    all_ = (k_hi <= q_lo) & (all_vertical | (q_hi // block - first_plain < local_blocks))
    return any_, all_


# ------------------------------------------------------------------------------------------------ one class per pattern
# One class per attention kind. Its dataclass fields are the pattern's parameters, declared here once: model.Config,
# train.py's `pattern.*` keys and longgen.convert's keyword arguments all take them by these names (one flat namespace:
# a name two patterns share must mean the same thing and have the same default). A field's metadata "min" is its
# smallest valid value (default 1). Adding a pattern is one subclass, decorated with @register.
PATTERNS: dict[str, type[Pattern]] = {}  # kind name -> its class, in the order registered


def register(cls: type[Pattern]) -> type[Pattern]:
    """Make a pattern class available under its `kind` (Config.layer_kinds, --sparse, YAML `sparse=`)."""
    defaults = parameters()
    for f in fields(cls):
        if f.name in defaults and defaults[f.name] != f.default:
            raise ValueError(f"{cls.__name__}.{f.name} defaults to {f.default}, but another pattern's {f.name} to "
                             f"{defaults[f.name]}: a shared parameter name must have one meaning and one default.")
    PATTERNS[cls.kind] = cls
    return cls


def parameters() -> dict[str, int]:
    """Every registered pattern's parameters with their defaults, by name (the flat namespace)."""
    return {f.name: f.default for cls in PATTERNS.values() for f in fields(cls)}


def check_parameters(params: dict, prefix: str = "") -> dict[str, int]:
    """`params` with the defaults of every registered pattern filled in, or a ValueError naming the first unknown or
    invalid one, written as `prefix` + its name (each pattern checks its own fields). model.Config and train.py's
    config (prefix "pattern.") both check through here."""
    defaults = parameters()
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown pattern parameter {prefix}{unknown[0]}; valid ones: {', '.join(defaults)}")
    params = {**defaults, **params}
    for kind in PATTERNS:
        try:
            make_pattern(kind, **params)
        except ValueError as e:
            raise ValueError(f"{prefix}{e}") from None
    return params


def make_pattern(kind: str, **params) -> Pattern:
    """The pattern `kind` with its parameters taken from `params` (other patterns' parameters are ignored, missing
    ones take their defaults)."""
    if kind not in PATTERNS:
        raise ValueError(f"unknown attention kind {kind!r}; registered: {', '.join(PATTERNS)}")
    cls = PATTERNS[kind]
    return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})


@dataclass(frozen=True)
class Pattern:
    """An attention kind with its parameters, in tokens. A subclass states its mask (mask_mod), the closed-form block
    rule that matches it (blocks), how many pairs it allows (keys_per_query), how far back it sees everything (reach),
    and, for the KV cache and context parallelism, which positions it keeps (capacity, slot_of, lookback, far_rows)."""

    kind: ClassVar[str]

    def __post_init__(self):
        for f in fields(self):
            value, least = getattr(self, f.name), f.metadata.get("min", 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{f.name}={value!r} must be an integer of at least {least}")

    def mask_mod(self, device=None) -> MaskMod:
        """(b, h, q, k) -> whether query position q sees key position k (parameters captured as int32 tensors)."""
        raise NotImplementedError

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        """For inclusive position intervals (broadcastable int64 tensors): (some pair is allowed, every pair is)."""
        raise NotImplementedError

    def keys_per_query(self, q: Tensor) -> Tensor:
        """(N,) int64 positions -> how many keys each query sees in a sequence that starts at 0."""
        raise NotImplementedError

    def pairs(self, n: int) -> int:
        """How many (query, key) pairs the pattern allows in a sequence of n tokens (the attention work to count)."""
        return int(self.keys_per_query(torch.arange(n, dtype=torch.int64)).sum())

    def reach(self) -> float:
        """The longest sequence in which the pattern allows every causal pair (k <= q < n): up to there it is causal
        attention, and a layer may take the full layers' kernel (SDPA flash) instead of flex."""
        return math.inf

    # the KV cache (cache.py): a static buffer of `capacity` slots, position p written to slot_of(p)
    def capacity(self, max_len: int) -> int:
        """Slots a sequence of up to max_len tokens needs: every position a later query can still see."""
        return max_len

    def slot_of(self, pos: Tensor) -> Tensor:
        """The slot each position is written to (any int32 tensor of positions)."""
        return pos

    # context parallelism (training/context_parallel.py): what a run of queries needs from before its first position a
    def lookback(self) -> int | None:
        """How many positions before a a query of the run can see without the document's start mattering (the local
        part); None: all of them (the kind all-gathers)."""
        return None

    def far_rows(self, before: Tensor) -> Tensor:
        """(..., 2) rows of two chunks of the run's document before a (counted from the document's start, a chunk at a
        time) -> (...,) the most of them that the pattern keeps beyond `lookback`, wherever the document starts."""
        return before.sum(-1)


@register
@dataclass(frozen=True)
class Full(Pattern):
    """Full causal attention: query q sees key k iff k <= q."""

    kind: ClassVar[str] = "full"

    def mask_mod(self, device=None) -> MaskMod:
        return causal()

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        return causal_blocks(q_lo, q_hi, k_lo, k_hi)

    def keys_per_query(self, q):
        return q + 1


@register
@dataclass(frozen=True)
class SinkWindow(Pattern):
    """Sink + window (sink_window): the first n_sink tokens and the last `window` (masks.sink_window)."""

    kind: ClassVar[str] = "sink_window"
    n_sink: int = field(default=64, metadata={"min": 0})  # first tokens always visible (one block)
    window: int = 2048  # most recent tokens visible, the query included (32 blocks)

    def mask_mod(self, device=None) -> MaskMod:
        return sink_window(self.n_sink, self.window, device)

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        return sink_window_blocks(q_lo, q_hi, k_lo, k_hi, self.n_sink, self.window)

    def keys_per_query(self, q):
        return torch.clamp(q + 1, max=self.window) + torch.clamp(q + 1 - self.window, min=0, max=self.n_sink)

    def reach(self) -> float:
        # the farthest pair whose key is not a sink, q = n - 1 and k = n_sink, needs n - 1 - n_sink < window
        return self.n_sink + self.window

    def capacity(self, max_len: int) -> int:
        return min(max_len, self.n_sink + self.window)

    def slot_of(self, pos):
        # sinks at their own slots, then a ring of `window` slots
        return torch.where(pos < self.n_sink, pos, self.n_sink + (pos - self.n_sink) % self.window)

    def lookback(self) -> int:
        return self.window - 1

    def far_rows(self, before):
        return before.sum(-1).clamp(max=self.n_sink)  # the document's sinks


@register
@dataclass(frozen=True)
class Strided(Pattern):
    """Strided blocks (strided): a few local blocks plus every `stride`-th block (masks.strided)."""

    kind: ClassVar[str] = "strided"
    block: int = 64  # block width, in tokens
    local_blocks: int = 16  # own block + 15 before it (not in the paper; the local-stride kernel's default)
    stride: int = 64  # every 64th block stays visible

    def mask_mod(self, device=None) -> MaskMod:
        return strided(self.block, self.local_blocks, self.stride, device)

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        return strided_blocks(q_lo, q_hi, k_lo, k_hi, self.block, self.local_blocks, self.stride)

    def keys_per_query(self, q):
        first_local = torch.clamp(q // self.block - self.local_blocks + 1, min=0)  # earliest local block
        return q - first_local * self.block + 1 + (first_local // self.stride) * self.block  # local + kept blocks

    def reach(self) -> float:
        # the query block local_blocks and the key block 0 are local_blocks apart, and block 0 is kept only with
        # stride == 1 (then every block is kept: no limit)
        return self.ring() if self.stride > 1 else math.inf

    def ring(self) -> int:
        """Slots of the local blocks' ring, in front of the kept blocks."""
        return self.local_blocks * self.block

    def capacity(self, max_len: int) -> int:
        return self.ring() + (-(-max_len // self.block) // self.stride) * self.block  # ring + kept blocks below max_len

    def slot_of(self, pos):
        kb, offset = pos // self.block, pos % self.block
        kept = (kb + 1) % self.stride == 0
        return torch.where(kept, self.ring() + (kb // self.stride) * self.block,
                           (kb % self.local_blocks) * self.block) + offset

    def lookback(self) -> int:
        return self.ring() - 1

    def far_rows(self, before):
        # the document's kept blocks: of n consecutive positions at most (n // P)·block + min(n % P, block)
        P = self.stride * self.block
        return ((before // P) * self.block + (before % P).clamp(max=self.block)).sum(-1)


KINDS = tuple(PATTERNS)  # the built-in kinds; PATTERNS also holds any registered later


def dense_mask(pattern: Pattern, q_len: int, kv_len: int, *, batch: int = 1, q_offset: int = 0,
               doc_ids: Tensor | None = None, device=None) -> Tensor:
    """The pattern as a boolean (B, 1, Q, K) tensor from the same mask_mod: the SDPA fallback where flex cannot run."""
    device = doc_ids.device if doc_ids is not None else torch.device(device or "cpu")
    return create_mask(_full_mask_mod(pattern, q_offset, doc_ids, device), batch, 1, q_len, kv_len, device)


def _full_mask_mod(pattern, q_offset, doc_ids, device):
    mask_mod = pattern.mask_mod(device)
    if doc_ids is not None:
        mask_mod = document(mask_mod, doc_ids)
    if q_offset:
        mask_mod = shifted(mask_mod, q_offset, device)
    return mask_mod


# ------------------------------------------------------------------------------------------------ block masks
def block_mask(pattern: Pattern, q_len: int, kv_len: int, *, batch: int = 1, q_offset: int = 0,
               doc_ids: Tensor | None = None, block_size: int | tuple[int, int] = 128, device=None) -> BlockMask:
    """A BlockMask for queries q_offset .. q_offset + q_len - 1 against keys 0 .. kv_len - 1, built from the block rules.

    Equal to `create_block_mask` of the same mask_mod (same partial and full blocks) without documents. With documents
    (doc_ids: (B, kv_len), non-decreasing), blocks that hold a document boundary are marked partial whenever they share a
    document, so they may hold a block `create_block_mask` would skip; the mask_mod inside partial blocks keeps the
    result exact.
    """
    QB, KB = (block_size, block_size) if isinstance(block_size, int) else block_size
    device = doc_ids.device if doc_ids is not None else torch.device(device or "cpu")
    q_lo, q_hi, q_cut = block_ranges(q_len, QB, q_offset, device)  # (NQ,)
    k_lo, k_hi, k_cut = block_ranges(kv_len, KB, 0, device)  # (NK,)
    if doc_ids is None:
        any_, all_ = pattern.blocks(q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :])  # (NQ, NK)
        any_, all_ = any_.expand(batch, -1, -1), all_.expand(batch, -1, -1)  # (B, NQ, NK)
    else:
        if not bool((doc_ids[:, 1:] >= doc_ids[:, :-1]).all()):
            raise ValueError("doc_ids must be non-decreasing along each row (one number per packed document).")
        any_, all_ = document_blocks(pattern, doc_ids, q_lo, q_hi, k_lo, k_hi)
    all_ = all_ & whole_tiles(q_cut, k_cut)
    return from_block_grid(any_, all_, _full_mask_mod(pattern, q_offset, doc_ids, device), q_len, kv_len, (QB, KB))


def from_block_grid(any_: Tensor, all_: Tensor, mask_mod: MaskMod, q_len: int, kv_len: int,
                    block_size: tuple[int, int]) -> BlockMask:
    """A BlockMask from (B, NQ, NK) grids: tiles where some pair is allowed, and tiles where every pair is."""
    partial, full = any_ & ~all_, all_
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


def block_ranges(length: int, block: int, offset: int = 0, device=None):
    """First and last position of every block of `length` tokens starting at `offset`, and whether the block is cut
    short by the end of the sequence."""
    lo = torch.arange(0, length, block, device=device)
    hi = torch.clamp(lo + block - 1, max=length - 1)
    return lo + offset, hi + offset, hi - lo + 1 < block


def whole_tiles(q_cut: Tensor, k_cut: Tensor) -> Tensor:
    """(NQ,), (NK,) -> (NQ, NK): the tiles of two whole blocks. A tile with a block cut short by the end of the
    sequence is never full, as create_block_mask pads it with masked entries."""
    return ~q_cut[:, None] & ~k_cut[None, :]


def document_blocks(pattern, doc_ids, q_lo, q_hi, k_lo, k_hi):
    """Block rules in document-local positions: (B, NQ, NK) any / all, for blocks given by their first and last
    position ((NQ,) and (NK,)). Exact for blocks of consecutive positions; for a block that holds only some of the
    positions of its range (training/context_parallel.py's gathered keys) "any" can only grow and "all" only shrink."""
    starts = document_starts(doc_ids)  # (B, S)

    def describe(lo, hi):  # per block: first and last document, and local positions of its first and last token
        d_lo, d_hi = doc_ids[:, lo], doc_ids[:, hi]  # (B, N)
        return d_lo, d_hi, lo - starts[:, lo], hi - starts[:, hi]

    qd_lo, qd_hi, q_llo, q_lhi = (t[:, :, None] for t in describe(q_lo, q_hi))  # (B, NQ, 1)
    kd_lo, kd_hi, k_llo, k_lhi = (t[:, None, :] for t in describe(k_lo, k_hi))  # (B, 1, NK)
    single = (qd_lo == qd_hi) & (kd_lo == kd_hi)  # both blocks lie inside one document each
    share = (qd_lo <= kd_hi) & (kd_lo <= qd_hi)  # the blocks have a document in common
    rule_any, rule_all = pattern.blocks(q_llo, q_lhi, k_llo, k_lhi)
    causal_any = (k_lo[None, None, :] <= q_hi[None, :, None])
    any_ = torch.where(single, share & rule_any, share & causal_any)
    all_ = single & share & rule_all
    return any_, all_


def _ordered(blocks: Tensor):
    """(B, NQ, NK) bool -> (B, 1, NQ) counts and (B, 1, NQ, NK) block indices, kept blocks first in increasing order."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[:, None], idx[:, None]


# ------------------------------------------------------------------------------------------------ the picture
def render(path, seq_len: int = 128, patterns: dict[str, Pattern] | None = None) -> None:
    """Draw each pattern's token-level mask side by side into a PNG (the paper's Fig. 1, at toy scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if patterns is None:  # the paper's shapes, scaled down 8x in blocks so the picture stays readable
        patterns = {
            "full attention (middle layers)": Full(),
            "sink + window": SinkWindow(n_sink=8, window=32),
            "strided blocks": Strided(block=8, local_blocks=2, stride=4),
        }
    fig, axes = plt.subplots(1, len(patterns), figsize=(4 * len(patterns), 4.3))
    for ax, (title, pattern) in zip(axes, patterns.items()):
        ax.imshow(dense_mask(pattern, seq_len, seq_len)[0, 0].numpy(), cmap="Blues", interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # python masks.py --out docs/patterns.png: the README's picture
    import argparse

    parser = argparse.ArgumentParser(description="Draw LongGen's attention patterns at toy scale (blocks of 8 tokens) "
                                                 "into a PNG: full causal, sink + window, strided blocks.")
    parser.add_argument("--out", default="patterns.png", help="where to write the PNG (default patterns.png)")
    parser.add_argument("--tokens", type=int, default=128, help="sequence length drawn (default 128)")
    options = parser.parse_args()
    if options.tokens < 1:
        parser.error("--tokens must be at least 1")
    render(options.out, options.tokens)
    print(f"Wrote {options.out}")
