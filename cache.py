"""The static, compacted KV cache: each attention kind keeps only what a future query can read.

    full         every position                        slot = position
    sink_window  the n_sink first tokens + a ring of the last `window` tokens
    strided      a ring of the last `local_blocks` blocks + every `stride`-th block, kept for good

Every slot records the position it holds (`slot_pos`, -1 = empty) and keys are stored after RoPE, so attention over the
compacted buffer is the pattern's own mask_mod at (query position, slot position): sinks, rings, kept blocks, padding
and rows of different lengths are one mechanism, exact by construction. A ring slot left holding an old token is always
outside the pattern. Buffers are allocated once and padded to multiples of 128 slots.

Prefill goes in chunks. A sparse layer's chunk attends to [the cache as it was | the chunk itself] (a first chunk to
itself alone, under the pattern's own mask), then keeps what survives (the last token written to each slot); writing
first would evict tokens the chunk's early queries still need.
Until a sparse layer's first eviction (sink + window: its first n_sink + window tokens, which sit at their own slots) a
chunk is written in place and attends as a full layer's does; a first chunk within the pattern's reach (every causal
pair allowed) takes SDPA's causal kernel, as a full layer's first chunk does.
Decoding writes the new token first and attends over the whole buffer: static shapes, ready for CUDA graphs. It runs
SDPA with a dense (B, 1, 1, C) mask: one query row has no tiles worth skipping, and SDPA decoded faster than flex
decoding (see BENCHMARKS.md); `flex_decode` keeps flex decoding for chosen kinds. For one sequence on a GPU,
kernels.norm_qkv_rope writes the new keys and values itself, reading two tables by position made here once: RoPE's
cos and sin (`rope_table`) and each kind's slot (`slots`).

Legend: B batch, G key/value heads, C slots, T tokens in this call, E head width.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_mask

from masks import Pattern, block_mask, block_ranges, dense_mask, from_block_grid, whole_tiles
from model import rope_angles, rope_frequencies

TILE = 128  # slots are allocated in multiples of this (flex's tile; other lengths crashed flex decoding on an H100)


def round_up(n: int, multiple: int = TILE) -> int:
    return -(-n // multiple) * multiple


class KindCache:
    """The buffers of every layer of one attention kind, and their shared slot table."""

    def __init__(self, pattern: Pattern, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device, dtype):
        self.pattern = pattern
        self.capacity = C = round_up(pattern.capacity(max_len))
        # One tensor per layer, not views of one stack: compiled, an in-place write into a view of a graph input is
        # not reinplaced, and every layer's one-token write copied the whole stack (see BENCHMARKS.md).
        shape = (batch, n_kv_heads, C, head_dim)  # (B, G, C, E)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.slot_pos = torch.full((batch, C), -1, device=device, dtype=torch.int32)  # (B, C) position in each slot
        self.mask_mod = pattern.mask_mod(device)
        positions = torch.arange(max_len, dtype=torch.int32)  # on the CPU: a "meta" cache (its size alone) has no data
        slots = self.slot_of(positions)
        self.slots = slots.to(device)  # (max_len,) the slot of every position
        # positions 0 .. in_place - 1 are stored at their own slot: until then nothing is evicted and a prefill chunk
        # is written in place, as a full layer's always is (sink + window: the first n_sink + window tokens)
        moved = (slots != positions).nonzero()
        self.in_place = int(moved[0, 0]) if len(moved) else max_len

    def slot_of(self, pos: Tensor) -> Tensor:
        """The slot each position is written to."""
        return self.pattern.slot_of(pos)

    def allowed(self, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
        """Which cached positions the queries may read (any broadcastable shapes)."""
        return (kv_pos >= 0) & self.mask_mod(None, None, q_pos, kv_pos)


class Cache:
    """KV cache for a batch of sequences of up to max_len tokens each. The model calls prepare() once per forward,
    update() in every layer, and advance() at the end; generate.py calls start_prefill() and start_decoding()."""

    def __init__(self, cfg, batch: int, max_len: int, device=None, dtype=torch.float32, flex_decode=()):
        """flex_decode: attention kinds whose decoding steps use flex decoding (on GPU) instead of SDPA with a dense
        mask (bench.py --flex-decode compares the two)."""
        self.cfg, self.batch, self.max_len = cfg, batch, max_len
        self.flex_decode = set(flex_decode)
        self.layer_kind = cfg.layer_kinds
        # layer -> its index within its kind
        self.index = [cfg.layer_kinds[:i].count(kind) for i, kind in enumerate(cfg.layer_kinds)]
        self.kinds = {kind: KindCache(cfg.pattern(kind), cfg.layer_kinds.count(kind), batch, max_len, cfg.n_kv_heads,
                                      cfg.head_dim, device, dtype) for kind in dict.fromkeys(cfg.layer_kinds)}
        self.pos = torch.zeros(batch, device=device, dtype=torch.int32)  # (B,) next position of each row
        # RoPE's cos and sin for every position, (max_len, E) each, made once: kernels.norm_qkv_rope reads a decoding
        # step's row (as for KindCache.slots: angles made inside a compiled step were made again for every layer)
        cos, sin = rope_angles(rope_frequencies(cfg, device), torch.arange(max_len, device=device), dtype)
        self.rope_table = cos.view(max_len, -1), sin.view(max_len, -1)
        self.lengths = torch.zeros(batch, device=device, dtype=torch.int32)  # (B,) prompt lengths
        self.filled, self.decoding = 0, False
        self._plans: dict[str, object] = {}
        self._decode_masks: dict[str, BlockMask] = {}

    # ---------------------------------------------------------------------------------------------- bookkeeping
    def start_prefill(self, lengths: Tensor) -> None:
        """Begin a batch whose prompts (right-padded to one length) have these lengths."""
        self.lengths.copy_(lengths)
        for kc in self.kinds.values():
            kc.slot_pos.fill_(-1)
        self.filled, self.decoding = 0, False

    def start_decoding(self) -> None:
        self.pos.copy_(self.lengths)
        self.decoding = True
        # flex decoding's masks, made here outside any compiled step (a CUDA graph would own tensors made inside)
        self._decode_masks = {kind: self._decode_block_mask(kind) for kind in self.kinds if kind in self.flex_decode}

    def mark_static(self) -> None:
        """Tell torch.compile these tensors keep their addresses, so a CUDA graph can update them in place."""
        buffers = (x for kc in self.kinds.values() for x in (*kc.k, *kc.v, kc.slot_pos, kc.slots))
        for t in (self.pos, self.lengths, *self.rope_table, *buffers):
            torch._dynamo.mark_static_address(t)

    def nbytes(self) -> dict[str, int]:
        """Bytes of keys and values held, per attention kind."""
        return {kind: sum(t.nbytes for t in kc.k + kc.v) for kind, kc in self.kinds.items()}

    def full_attention_nbytes(self) -> int:
        """Bytes of keys and values the same cache would hold with every layer full."""
        cfg, itemsize = self.cfg, next(iter(self.kinds.values())).k[0].element_size()
        return 2 * cfg.n_layers * self.batch * cfg.n_kv_heads * round_up(self.max_len) * cfg.head_dim * itemsize

    # ---------------------------------------------------------------------------------------------- per forward
    def prepare(self, T: int, use_flex: bool):
        """Positions of this call's tokens, (T,) or (B, 1), and one attention mask per kind."""
        return self._prepare_decode(use_flex) if self.decoding else self._prepare_chunk(T, use_flex)

    def _prepare_decode(self, use_flex: bool):
        pos, masks = self.pos, {}
        rows = torch.arange(self.batch, device=pos.device)
        for kind, kc in self.kinds.items():
            kc.slot_pos[rows, kc.slot_of(pos)] = pos
            if use_flex and kind in self.flex_decode:  # flex decoding, split over the keys
                masks[kind] = self._decode_masks[kind]
            else:
                masks[kind] = kc.allowed(pos[:, None], kc.slot_pos)[:, None, None, :]  # (B, 1, 1, C)
        return pos[:, None], masks

    def _decode_block_mask(self, kind: str) -> BlockMask:
        """One query per row against every slot, all tiles partial. Valid for every step, since its mask_mod reads
        the live pos and slot_pos tensors, so a CUDA graph can replay it."""
        kc, pos, B = self.kinds[kind], self.pos, self.batch
        n_tiles = kc.capacity // TILE
        num = torch.full((B, 1, 1), n_tiles, device=pos.device, dtype=torch.int32)
        idx = torch.arange(n_tiles, device=pos.device, dtype=torch.int32).expand(B, 1, 1, n_tiles).contiguous()
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=TILE, seq_lengths=(1, kc.capacity),
                                        mask_mod=lambda b, h, q, kv: kc.allowed(pos[b], kc.slot_pos[b, kv]))

    def _prepare_chunk(self, T: int, use_flex: bool):
        c0, B = self.filled, self.batch
        device = self.pos.device
        positions = torch.arange(c0, c0 + T, device=device, dtype=torch.int32)  # (T,)
        valid = positions[None, :] < self.lengths[:, None]  # (B, T): right padding is never stored
        masks = {}
        for kind, kc in self.kinds.items():
            if c0 + T <= kc.in_place:  # nothing evicted yet: write the chunk in place, attend to everything up to it
                self._plans[kind] = None
                masks[kind] = self._prefix_mask(kc, c0, T, use_flex)
                continue
            C = kc.capacity
            slot = torch.where(valid, kc.slot_of(positions)[None, :], C)  # (B, T), C = not stored
            owner = torch.full((B, C + 1), -1, device=device, dtype=torch.long).scatter_reduce_(
                1, slot.long(), torch.arange(T, device=device).expand(B, T), "amax")[:, :C]  # (B, C) last writer
            self._plans[kind] = owner
            # an empty cache: the chunk attends to itself alone (update() gives it no cached keys)
            masks[kind] = self._chunk_mask(kc, c0, T, use_flex) if c0 else self._prefix_mask(kc, 0, T, use_flex)
        return positions, masks

    def _prefix_mask(self, kc: KindCache, c0: int, T: int, use_flex: bool):
        """Queries c0 .. c0 + T - 1 against keys 0 .. c0 + T - 1 held in order: None (SDPA's causal kernel) for a first
        chunk within the pattern's reach, else the pattern's mask."""
        if c0 == 0 and T <= kc.pattern.reach():
            return None
        if use_flex:
            return block_mask(kc.pattern, T, c0 + T, batch=self.batch, q_offset=c0, block_size=self.cfg.mask_block,
                              device=self.pos.device)
        return dense_mask(kc.pattern, T, c0 + T, batch=self.batch, q_offset=c0, device=self.pos.device)

    def _chunk_mask(self, kc: KindCache, c0: int, T: int, use_flex: bool):
        """Queries c0 .. c0 + T - 1 against [the cache's C slots | the chunk's T tokens]."""
        C, B, device = kc.capacity, self.batch, self.pos.device
        slot_pos = kc.slot_pos  # read by the kernel before advance() updates it
        c0_t, C_t = (torch.tensor(x, device=device, dtype=torch.int32) for x in (c0, C))

        def chunk_mask(b, h, q, kv):
            cached = kv < C_t
            kv_pos = torch.where(cached, slot_pos[b, torch.clamp(kv, max=C - 1)], kv - C_t + c0_t)
            return kc.allowed(q + c0_t, kv_pos)

        if not use_flex:
            return create_mask(chunk_mask, B, 1, T, C + T, device)
        QB = KB = self.cfg.mask_block
        q_lo, q_hi, q_cut = block_ranges(T, QB, c0, device)  # (NQ,)
        # cache tiles: the hull of their stored positions, where the pattern could allow anything; never full
        held = slot_pos.view(B, C // KB, KB)
        lo = torch.where(held >= 0, held, torch.iinfo(torch.int32).max).amin(-1)  # (B, NC)
        hi = held.amax(-1)
        cache_any, _ = kc.pattern.blocks(q_lo[None, :, None], q_hi[None, :, None], lo[:, None, :], hi[:, None, :])
        cache_any &= (hi >= 0)[:, None, :]  # (B, NQ, NC)
        # chunk tiles: positions are contiguous, the block rules are exact
        k_lo, k_hi, k_cut = block_ranges(T, KB, c0, device)
        any_, all_ = kc.pattern.blocks(q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :])
        all_ = all_ & whole_tiles(q_cut, k_cut)
        any_ = torch.cat([cache_any, any_.expand(B, -1, -1)], dim=-1)
        all_ = torch.cat([torch.zeros_like(cache_any), all_.expand(B, -1, -1)], dim=-1)
        return from_block_grid(any_, all_, chunk_mask, T, C + T, (QB, KB))

    def decode_buffers(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """Where a decoding step puts this layer's new keys and values: its buffers (B, G, C, E), at slot slots[pos]
        with slots (max_len,) the slot of every position. update() writes there; kernels.norm_qkv_rope writes there
        itself."""
        kc = self.kinds[self.layer_kind[layer]]
        return kc.k[self.index[layer]], kc.v[self.index[layer]], kc.slots

    def update(self, layer: int, k_BGTE: Tensor, v_BGTE: Tensor) -> tuple[Tensor, Tensor]:
        """Store this layer's new keys/values; return the keys/values its queries attend to, (B, G, S, E)."""
        if self.decoding:
            K, V, slots = self.decode_buffers(layer)
            rows, slot = torch.arange(self.batch, device=K.device), slots[self.pos]  # (B,), (B,)
            K[rows, :, slot] = k_BGTE[:, :, 0]
            V[rows, :, slot] = v_BGTE[:, :, 0]
            return K, V
        kind = self.layer_kind[layer]
        kc = self.kinds[kind]
        K, V = kc.k[self.index[layer]], kc.v[self.index[layer]]  # (B, G, C, E)
        plan = self._plans[kind]
        c0, c1 = self.filled, self.filled + k_BGTE.shape[2]
        if plan is None:  # in place (full layers always; sparse ones before their first eviction)
            K[:, :, c0:c1], V[:, :, c0:c1] = k_BGTE, v_BGTE
            return K[:, :, :c1], V[:, :, :c1]
        keys, values = (k_BGTE, v_BGTE) if c0 == 0 else (  # a first chunk attends to itself alone
            torch.cat([K, k_BGTE], dim=2), torch.cat([V, v_BGTE], dim=2))  # later ones to [the cache as it was | chunk]
        owner = plan  # (B, C)
        take = owner.clamp(min=0)[:, None, :, None].expand(-1, K.shape[1], -1, K.shape[3])
        if c0 == 0:  # an empty cache: a slot the chunk does not fill keeps slot_pos -1 and is never read, so every
            torch.gather(k_BGTE, 2, take, out=K)  # slot takes its gather, in one pass each
            torch.gather(v_BGTE, 2, take, out=V)
            return keys, values
        stored = (owner >= 0)[:, None, :, None]
        torch.where(stored, k_BGTE.gather(2, take), K, out=K)
        torch.where(stored, v_BGTE.gather(2, take), V, out=V)
        return keys, values

    def advance(self, T: int) -> None:
        """After all layers: move the positions on."""
        if self.decoding:
            self.pos += 1
            return
        c0 = self.filled
        for kind, kc in self.kinds.items():
            owner = self._plans[kind]
            if owner is None:
                kc.slot_pos[:, c0:c0 + T] = torch.arange(c0, c0 + T, device=kc.slot_pos.device, dtype=torch.int32)
            else:
                kc.slot_pos.copy_(torch.where(owner >= 0, (c0 + owner).to(torch.int32), kc.slot_pos))
        self.filled += T
