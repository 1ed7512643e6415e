"""Context parallelism (CP): the sequence of a training batch split over the ranks of a process group, so that one
128K-token sequence trains on several GPUs. Each rank keeps its T = S / cp tokens through embeddings, norms,
feed-forward and head; only attention needs other ranks' keys and values, and each attention kind fetches just what
its mask can reach.

Sharding is zig-zag: the sequence is cut into 2·cp equal chunks and rank r holds chunks r and 2·cp-1-r, so every rank
has the same causal attention work. Exchange per kind (`exchange="pattern"`, the default), in K and V rows each rank
receives from the others per layer:

  * full: all of them, an all-gather: (cp - 1)·T = S - T rows, growing with S;
  * sink_window: the sink and the `window - 1` tokens before each of its chunks, an all-to-all of only those rows:
    at most n_sink + 2·(window - 1), whatever S (128K tokens, cp = 8: 2,047-4,158 rows instead of 114,688);
  * strided: the local blocks before each chunk and every kept (stride-th) block before it, the same all-to-all:
    at most 2·(local_blocks - 1)·block + S / stride (128K, cp = 8: 1,792-3,456 rows).

With packed documents (doc_ids, how train.py trains) each document has its own sink, window and blocks, so which rows
a chunk needs depends on where the document that runs into it starts. A sink + window chunk then needs the
`window - 1` rows before it and that document's sink; a strided chunk its local blocks and that document's kept
blocks (documents that start inside a chunk find the keys they reach inside it). Those rows are exchanged, each rank's
share padded to `capacity`, the most any placement of documents can need, so that every step exchanges tensors of
the same shapes (compiled code is not made again for each batch) and moves about as much as without documents. The
padding rows are masked out. `exchange="allgather"` all-gathers every kind instead, to measure against.

Backward sends as much back: the all-gather's gradient is a reduce-scatter, the all-to-all's the reverse all-to-all
(both autograd-aware functional collectives, the kind torch.compile traces). `CPAttention.exchange` counts the rows,
`exchange_report` turns a step's counts into bytes.

Masks are masks.py's mask_mods evaluated at global positions: a dense (B, 1, T, K) tensor for SDPA on CPU, or a
BlockMask for flex on GPU, whose tiles are rated per document (masks.document_blocks) as in one process.

Legend: B batch, S whole sequence, T tokens of this rank, K keys this rank gathers, R ranks of the CP group,
D model width, H query heads, G key/value heads, E head width, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from errors import UserError
from masks import (Pattern, document, document_blocks, document_ends, document_starts, from_block_grid,
                   whole_tiles)
from model import Transformer, masked_attention


# ------------------------------------------------------------------------------------------------ sharding
def zigzag_positions(seq_len: int, cp: int, rank: int, device=None) -> Tensor:
    """(T,) global positions `rank` holds: chunk `rank` then chunk `2·cp - 1 - rank` of the 2·cp equal chunks."""
    if seq_len % (2 * cp):
        raise UserError(f"seq_len={seq_len} must be a multiple of 2 * cp_degree = {2 * cp} for zig-zag sharding; "
                        "change seq_len or cp_degree.")
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in (rank, 2 * cp - 1 - rank)])


def shard(x_BS: Tensor, group) -> Tensor:
    """(B, S, ...) -> (B, T, ...): this rank's tokens (inputs, targets) in zig-zag order."""
    positions = zigzag_positions(x_BS.shape[1], dist.get_world_size(group), dist.get_rank(group), x_BS.device)
    return x_BS[:, positions]


def unshard(x_BT: Tensor, group) -> Tensor:
    """(B, T, ...) of every rank -> (B, S, ...) in sequence order, the same on every rank (differentiable)."""
    cp, T = dist.get_world_size(group), x_BT.shape[1]
    # (R·T, B, ...), rank after rank
    x_SB = funcol.all_gather_tensor_autograd(x_BT.movedim(1, 0).contiguous(), 0, group)
    order = torch.cat([zigzag_positions(cp * T, cp, r, x_BT.device) for r in range(cp)])
    return x_SB[order.argsort()].movedim(0, 1)


# ------------------------------------------------------------------------------------------------ what to exchange
EXCHANGES = ("pattern", "allgather")


def needed_keys(pattern: Pattern, positions_RT: Tensor, doc_ids_BS: Tensor | None = None) -> Tensor:
    """(R, R, T) bool, [dst, src, t]: some query of rank dst may attend to the key at positions_RT[src, t] (in some row
    of the batch). Each rank's queries are its two chunks, contiguous runs, for which masks.py's block rules are exact
    per key. With documents, a key is seen only by the queries of its own document, in positions within it: of the
    run [q_lo, q_hi], those from max(q_lo, key) to the end of the key's document."""
    R, T = positions_RT.shape
    runs_R2C = positions_RT.view(R, 2, T // 2)
    q_lo, q_hi = runs_R2C[:, None, :, 0, None], runs_R2C[:, None, :, -1, None]  # (R, 1, 2, 1): dst, -, run, -
    k = positions_RT[None, :, None, :]  # (1, R, 1, T): -, src, -, t
    if doc_ids_BS is None:
        return pattern.blocks(q_lo, q_hi, k, k)[0].any(2)
    start = document_starts(doc_ids_BS)[:, None, k[0]]  # (B, 1, R, 1, T): its document's first and last token
    end = document_ends(doc_ids_BS)[:, None, k[0]]
    lo, hi = torch.maximum(q_lo, k), torch.minimum(q_hi, end)  # (B, R, R, 2, T)
    any_ = pattern.blocks(lo - start, hi - start, k - start, k - start)[0] & (lo <= hi)
    return any_.any(3).any(0)


def capacity(pattern: Pattern, positions_RT: Tensor, batch: int) -> Tensor:
    """(R, R) int, [dst, src]: the most rows of src that a sparse kind's queries on dst can need, with documents
    anywhere in each of the batch's rows; T for src = dst (a rank takes all its own rows).

    Remote keys of a run (chunk) of dst lie before its first position a, in the document that runs into it (start s).
    They are the pattern's `lookback` rows before a (Pattern.lookback: window - 1, or local_blocks·block - 1; fixed
    positions, the same for every row of the batch) and that document's own part (Pattern.far_rows: its n_sink sink
    rows, or its kept blocks, at most (n // P)·block + min(n % P, block) of n consecutive positions with P =
    stride·block, whatever s).
    """
    R, T = positions_RT.shape
    C = T // 2
    first = positions_RT.view(R, 2, C)[..., 0]  # (R, 2): first position of each chunk
    a = first[:, None, :, None]  # (R, 1, 2, 1): dst's runs
    c_lo, c_hi = first[None, :, None, :], first[None, :, None, :] + C - 1  # (1, R, 1, 2): src's chunks
    reach = pattern.lookback()
    fixed = (torch.minimum(a - 1, c_hi) - torch.maximum(a - reach, c_lo) + 1).clamp(min=0)  # (R, R, 2, 2)
    before = (a - c_lo).clamp(0, C)  # rows of each chunk of src before each run of dst
    own = pattern.far_rows(before)  # (R, R, 2)
    cap = (fixed.sum(-1) + batch * own).sum(-1).clamp(max=T)  # (R, R)
    cap.diagonal().fill_(T)
    return cap


def _padded(need_T: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(n,) indices of need_T's True entries in order, then the last of them again up to n (or 0, if there is none),
    and (n,) whether each is a real one."""
    if n == 0:  # this pair of ranks exchanges nothing (e.g. no sink and no window rows there)
        return need_T.new_zeros(0, dtype=torch.long), need_T.new_zeros(0)
    idx = torch.argsort((~need_T).to(torch.int8), stable=True)[:n]  # needed first, in order
    count = need_T.sum()
    real = torch.arange(n, device=need_T.device) < count
    return torch.where(real, idx, idx[(count - 1).clamp(min=0)]), real


def cp_mask(pattern: Pattern, q_pos_T: Tensor, k_pos_K: Tensor, doc_ids_BS: Tensor | None = None,
            use_flex: bool = False, block_size: int = 128, k_real_K: Tensor | None = None) -> Tensor | BlockMask:
    """The pattern's mask for queries at global positions q_pos against keys at k_pos (doc_ids: of the whole sequence):
    a dense (B or 1, 1, T, K) bool tensor for SDPA, or a BlockMask for flex that allows exactly the same pairs.
    k_real_K: False for padding keys, which no query sees."""
    mask_mod = pattern.mask_mod(q_pos_T.device)
    if doc_ids_BS is not None:
        mask_mod = document(mask_mod, doc_ids_BS)
    batch = 1 if doc_ids_BS is None else doc_ids_BS.shape[0]
    if not use_flex:
        b = torch.arange(batch, device=q_pos_T.device)[:, None, None, None]
        mask = mask_mod(b, 0, q_pos_T[:, None], k_pos_K[None, :])
        if k_real_K is not None:
            mask = mask & k_real_K
        return mask.reshape(-1, 1, len(q_pos_T), len(k_pos_K))

    def remapped(b, h, q, k):  # physical row and column -> global positions
        allowed = mask_mod(b, h, q_pos_T[q], k_pos_K[k])
        return allowed if k_real_K is None else allowed & k_real_K[k]

    # Tiles are rated on the range of positions they hold: "any" can only grow and "all" only shrink, so the mask_mod
    # inside partial tiles keeps the result exact (and the rating is exact where a tile's positions are contiguous).
    q_lo, q_hi, q_cut = _tile_ranges(q_pos_T, block_size)
    k_lo, k_hi, k_cut = _tile_ranges(k_pos_K, block_size)
    if doc_ids_BS is None:
        any_, all_ = pattern.blocks(q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :])
        any_, all_ = any_.expand(batch, -1, -1), all_.expand(batch, -1, -1)
    else:
        any_, all_ = document_blocks(pattern, doc_ids_BS, q_lo, q_hi, k_lo, k_hi)  # (B, NQ, NK)
    if k_real_K is not None:  # a tile with padding keys is never full (full tiles skip the mask_mod)
        k_cut = k_cut | ~_tile_ranges(k_real_K.to(torch.int8), block_size)[0].bool()
    all_ = all_ & whole_tiles(q_cut, k_cut)
    return from_block_grid(any_, all_, remapped, len(q_pos_T), len(k_pos_K), (block_size, block_size))


def _tile_ranges(pos: Tensor, tile: int):
    """Smallest and largest position in each run of `tile` entries, and whether the run is cut short by the end."""
    pad = -len(pos) % tile
    tiles = torch.cat([pos, pos[-1:].expand(pad)]).view(-1, tile)  # the last tile holds pos[-1] already
    cut = torch.zeros(len(tiles), dtype=torch.bool, device=pos.device)
    cut[-1] = pad > 0
    return tiles.amin(1), tiles.amax(1), cut


# ------------------------------------------------------------------------------------------------ attention
class CPAttention:
    """One attention kind under CP for one batch layout: the K/V rows this rank exchanges and the mask of its queries
    against the keys it gathers. Made once per batch and kind, shared by every layer of that kind (as model.masks);
    `exchange_and_attend` returns exactly this rank's rows of the single-process attention."""

    def __init__(self, pattern: Pattern, seq_len: int, group, doc_ids_BS: Tensor | None = None, use_flex: bool = False,
                 block_size: int = 128, device=None, exchange: str = "pattern"):
        if exchange not in EXCHANGES:
            raise UserError(f"cp_exchange={exchange!r} is not one of {', '.join(EXCHANGES)}; pick one.")
        self.group, cp, rank = group, dist.get_world_size(group), dist.get_rank(group)
        positions_RT = torch.stack([zigzag_positions(seq_len, cp, r, device) for r in range(cp)])
        T, k_real_K = positions_RT.shape[1], None
        if pattern.lookback() is None or exchange == "allgather":  # a kind that sees every key before it
            self.send_rows = None  # all-gather: every rank receives every row
            self.recv_counts = [T] * cp
            keys_K = positions_RT.flatten()
        elif doc_ids_BS is None:  # the rows the pattern reaches, the same for every batch
            need_RRT = needed_keys(pattern, positions_RT)
            self.send_rows = need_RRT[:, rank].nonzero()[:, 1]  # this rank's rows, grouped by destination rank
            self.send_counts = need_RRT[:, rank].sum(-1).tolist()
            self.recv_counts = need_RRT[rank].sum(-1).tolist()
            keys_K = positions_RT[need_RRT[rank]]  # global positions of the received rows, in the order they arrive
        else:  # the rows this batch's documents reach, padded to the capacity of each pair of ranks
            need_RRT = needed_keys(pattern, positions_RT, doc_ids_BS)
            need_RRT[range(cp), range(cp)] = True  # all of a rank's own rows: a fixed count
            cap_RR = capacity(pattern, positions_RT, doc_ids_BS.shape[0])
            if bool((need_RRT.sum(-1) > cap_RR).any()):
                raise RuntimeError("context_parallel.capacity is below the rows a batch needs; this is a bug.")
            cap = cap_RR.tolist()
            self.send_rows = torch.cat([_padded(need_RRT[d, rank], cap[d][rank])[0] for d in range(cp)])
            self.send_counts = [cap[d][rank] for d in range(cp)]
            self.recv_counts = cap[rank]
            received = [_padded(need_RRT[rank, s], cap[rank][s]) for s in range(cp)]
            keys_K = torch.cat([positions_RT[s, idx] for s, (idx, _) in enumerate(received)])
            k_real_K = torch.cat([real for _, real in received])
            needed = need_RRT[rank].sum(-1).tolist()
        self.rows = sum(self.recv_counts) - self.recv_counts[rank]  # what arrives from the other ranks, padding too
        self.needed_rows = self.rows if k_real_K is None else sum(needed) - needed[rank]
        self.allgather_rows = (cp - 1) * T
        self.mask = cp_mask(pattern, positions_RT[rank], keys_K, doc_ids_BS, use_flex, block_size, k_real_K)

    def gather(self, x_BGTE: Tensor) -> Tensor:
        """(B, G, T, E) rows of this rank -> (B, G, K, E) rows its queries need; gradients flow back to the owners."""
        x_TBGE = x_BGTE.permute(2, 0, 1, 3)
        if self.send_rows is None:
            x_KBGE = funcol.all_gather_tensor_autograd(x_TBGE.contiguous(), 0, self.group)
        else:
            x_KBGE = funcol.all_to_all_single_autograd(x_TBGE[self.send_rows].contiguous(), self.recv_counts,
                                                       self.send_counts, self.group)
        return x_KBGE.permute(1, 2, 0, 3)

    def exchange_and_attend(self, q_BHTE: Tensor, k_BGTE: Tensor, v_BGTE: Tensor) -> Tensor:
        """(B, H, T, E): this rank's rows of the single-process attention with this kind's mask."""
        k_BGKE, v_BGKE = self.gather(torch.cat([k_BGTE, v_BGTE], dim=-1)).chunk(2, dim=-1)  # one exchange for both
        return masked_attention(q_BHTE, k_BGKE, v_BGKE, self.mask)

    def exchange(self) -> dict:
        """K/V rows this rank receives from the other ranks in one layer's forward: sent (padding included), needed
        by the masks, and what an all-gather would send."""
        return dict(rows=self.rows, needed_rows=self.needed_rows, allgather_rows=self.allgather_rows)

    def bytes_received(self, k_BGTE: Tensor) -> int:
        """K and V bytes this rank receives from other ranks in one layer's forward (backward sends as many back)."""
        return 2 * self.rows * k_BGTE[:, :, 0].numel() * k_BGTE.element_size()


# ------------------------------------------------------------------------------------------------ the model
def cp_masks(model: Transformer, seq_len: int, group, doc_ids_BS: Tensor | None = None, device=None,
             exchange: str = "pattern") -> dict[str, CPAttention]:
    """One CPAttention per attention kind of the model, flex where model.flex_for picks it for this rank's tokens."""
    T = seq_len // dist.get_world_size(group)
    use_flex = model.flex_for(T, device)
    return {kind: CPAttention(model.cfg.pattern(kind), seq_len, group, doc_ids_BS, use_flex, model.cfg.mask_block,
                              device, exchange)
            for kind in set(model.cfg.layer_kinds)}


def cp_forward(model: Transformer, tokens_BT: Tensor, group, doc_ids_BS: Tensor | None = None,
               targets_BT: Tensor | None = None, loss_chunk: int = 4096, exchange: str = "pattern",
               stats: dict | None = None) -> Tensor:
    """(B, T, V): this rank's rows of model(tokens_BS, doc_ids=doc_ids_BS), given tokens_BT = shard(tokens_BS, group).
    doc_ids_BS is the whole sequence's (every rank has it). The model may be FSDP-sharded and checkpoint-wrapped.
    targets_BT (this rank's shard of the targets): instead of logits, their summed cross-entropy, made loss_chunk
    tokens at a time as model.forward does (cp_mean turns it into this rank's share of the mean).
    exchange: "pattern" (each kind the rows its mask reaches) or "allgather" (every kind all of them).
    stats: a dict to which this call's exchanged rows are added, per kind (for exchange_report)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    (B, T), device = tokens_BT.shape, tokens_BT.device
    if T * cp > model.cfg.max_seq_len:
        raise UserError(f"{T * cp} tokens exceed the model's max_seq_len={model.cfg.max_seq_len}; shorten the input "
                        "or raise max_seq_len.")
    positions = zigzag_positions(T * cp, cp, rank, device)  # (T,)
    if doc_ids_BS is not None:
        positions = positions - document_starts(doc_ids_BS)[:, positions]  # (B, T), restart with every document
    masks = cp_masks(model, T * cp, group, doc_ids_BS, device, exchange)
    if stats is not None:
        cfg = model.cfg
        for kind, mask in masks.items():
            entry = stats.setdefault(kind, dict(layers=cfg.layer_kinds.count(kind), rows=0, needed_rows=0,
                                                allgather_rows=0,
                                                row_elements=2 * B * cfg.n_kv_heads * cfg.head_dim))  # K and V
            for key, value in mask.exchange().items():
                entry[key] += value
    return model(tokens_BT, positions=positions, masks=masks, targets=targets_BT, loss_chunk=loss_chunk)


def exchange_report(stats: dict, element_size: int, group=None) -> dict:
    """Per kind, what cp_forward's calls (one training step's forwards) exchanged, summed over the ranks of `group`
    (a collective: every rank calls it): K/V rows received from other ranks in one layer's forward (sent, padding
    included; needed by the masks; an all-gather's), and bytes per step: those rows of every layer of the kind, in the
    forward and again in the backward (the gradients go back to their owners). Activation checkpointing may recompute
    the forward and fetch them once more; that is not counted."""
    kinds = sorted(stats)
    keys = ("rows", "needed_rows", "allgather_rows")
    counts = torch.tensor([[stats[k][key] for key in keys] for k in kinds], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        counts = counts.cuda()
    dist.all_reduce(counts, group=group)
    report = {}
    for kind, (rows, needed, gathered) in zip(kinds, counts.tolist()):
        per_row = 2 * stats[kind]["layers"] * stats[kind]["row_elements"] * element_size  # forward and backward
        report[kind] = dict(layers=stats[kind]["layers"], rows_per_layer=int(rows), needed_rows_per_layer=int(needed),
                            allgather_rows_per_layer=int(gathered), bytes_per_step=int(rows * per_row),
                            allgather_bytes_per_step=int(gathered * per_row),
                            of_allgather=rows / gathered if gathered else 0.0)
    return report


def cp_mean(loss_sum: Tensor, targets_BT: Tensor, group) -> Tensor:
    """This rank's share of the mean next-token loss, from the summed loss over its shard of the targets (-100
    ignored), scaled so that its mean over the CP group, and so FSDP's gradient averaging, gives the single-process
    mean over all S tokens."""
    count = (targets_BT != -100).sum()
    dist.all_reduce(count, group=group)
    return loss_sum * dist.get_world_size(group) / count.clamp(min=1)
