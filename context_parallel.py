"""Context parallelism (CP): the sequence of a training batch split over the ranks of a process group, so that one
128K-token sequence trains on several GPUs. Each rank keeps its T = S / cp tokens through embeddings, norms,
feed-forward and head; only attention needs other ranks' keys and values, and each attention kind fetches just what
its mask can reach.

Sharding is zig-zag: the sequence is cut into 2·cp equal chunks and rank r holds chunks r and 2·cp-1-r, so every rank
has the same causal attention work. Exchange per kind, in K and V rows each rank receives per layer:

  * full: all of them, an all-gather: (cp - 1)·T = S - T rows, growing with S;
  * sink_window: the sink and the `window - 1` tokens before each of its chunks, an all-to-all of only those rows:
    at most n_sink + 2·(window - 1), whatever S (128K tokens, cp = 8: 2,047-4,158 rows instead of 114,688);
  * strided: the local blocks before each chunk and every kept (stride-th) block before it, the same all-to-all:
    at most 2·(local_blocks - 1)·block + S / stride (128K, cp = 8: 1,792-3,456 rows).

Backward sends as much back: the all-gather's gradient is a reduce-scatter, the all-to-all's the reverse all-to-all
(both autograd-aware functional collectives, the kind torch.compile traces; not yet tried compiled).
`CPAttention.bytes_received` measures the exchange.

Masks are masks.py's mask_mods evaluated at global positions: a dense (B, 1, T, K) tensor for SDPA on CPU, or a
BlockMask for flex on GPU. Packed documents (doc_ids) are exact, but then every kind all-gathers: which keys a
document's own sink and window reach depends on its boundaries, and exchanging only those is not done.

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
from masks import Pattern, causal_blocks, document, document_starts, from_block_grid
from model import Transformer, attend


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
    x_SB = funcol.all_gather_single(x_BT.movedim(1, 0).contiguous(), 0, group)  # (R·T, B, ...), rank after rank
    order = torch.cat([zigzag_positions(cp * T, cp, r, x_BT.device) for r in range(cp)])
    return x_SB[order.argsort()].movedim(0, 1)


# ------------------------------------------------------------------------------------------------ what to exchange
def needed_keys(pattern: Pattern, positions_RT: Tensor) -> Tensor:
    """(R, R, T) bool, [dst, src, t]: some query of rank dst may attend to the key at positions_RT[src, t]. Each rank's
    queries are its two chunks, contiguous runs, for which masks.py's block rules are exact per key."""
    R, T = positions_RT.shape
    runs_R2C = positions_RT.view(R, 2, T // 2)
    q_lo, q_hi = runs_R2C[:, None, :, 0, None], runs_R2C[:, None, :, -1, None]  # (R, 1, 2, 1)
    k = positions_RT[None, :, None, :]  # (1, R, 1, T)
    return pattern.blocks(q_lo, q_hi, k, k)[0].any(2)


def cp_mask(pattern: Pattern, q_pos_T: Tensor, k_pos_K: Tensor, doc_ids_BS: Tensor | None = None,
            flex: bool = False, block_size: int = 128) -> Tensor | BlockMask:
    """The pattern's mask for queries at global positions q_pos against keys at k_pos (doc_ids: of the whole sequence):
    a dense (B or 1, 1, T, K) bool tensor for SDPA, or a BlockMask for flex that allows exactly the same pairs."""
    mask_mod = pattern.mask_mod(q_pos_T.device)
    if doc_ids_BS is not None:
        mask_mod = document(mask_mod, doc_ids_BS)
    batch = 1 if doc_ids_BS is None else doc_ids_BS.shape[0]
    if not flex:
        b = torch.arange(batch, device=q_pos_T.device)[:, None, None, None]
        return mask_mod(b, 0, q_pos_T[:, None], k_pos_K[None, :]).reshape(-1, 1, len(q_pos_T), len(k_pos_K))

    def remapped(b, h, q, k):  # physical row and column -> global positions
        return mask_mod(b, h, q_pos_T[q], k_pos_K[k])

    # Tiles are rated on the range of positions they hold: "any" can only grow and "all" only shrink, so the mask_mod
    # inside partial tiles keeps the result exact (and the rating is exact where a tile's positions are contiguous).
    q_lo, q_hi, q_cut = _tile_ranges(q_pos_T, block_size)
    k_lo, k_hi, k_cut = _tile_ranges(k_pos_K, block_size)
    if doc_ids_BS is None:
        any_, all_ = pattern.blocks(q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :])
    else:  # document boundaries only remove pairs: rate tiles as causal, none full
        any_ = causal_blocks(q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :])[0]
        all_ = torch.zeros_like(any_)
    all_ = all_ & ~q_cut[:, None] & ~k_cut[None, :]
    return from_block_grid(any_.expand(batch, -1, -1), all_.expand(batch, -1, -1), remapped, len(q_pos_T),
                           len(k_pos_K), (block_size, block_size))


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
    `attend` returns exactly this rank's rows of the single-process attention."""

    def __init__(self, pattern: Pattern, seq_len: int, group, doc_ids_BS: Tensor | None = None, flex: bool = False,
                 block_size: int = 128, device=None):
        self.group, cp, rank = group, dist.get_world_size(group), dist.get_rank(group)
        positions_RT = torch.stack([zigzag_positions(seq_len, cp, r, device) for r in range(cp)])
        if pattern.kind == "full" or doc_ids_BS is not None:
            self.send_rows = None  # all-gather: every rank receives every row
            self.recv_counts = [positions_RT.shape[1]] * cp
            keys_K = positions_RT.flatten()
        else:
            need_RRT = needed_keys(pattern, positions_RT)
            self.send_rows = need_RRT[:, rank].nonzero()[:, 1]  # this rank's rows, grouped by destination rank
            self.send_counts = need_RRT[:, rank].sum(-1).tolist()
            self.recv_counts = need_RRT[rank].sum(-1).tolist()
            keys_K = positions_RT[need_RRT[rank]]  # global positions of the received rows, in the order they arrive
        self.remote_rows = sum(self.recv_counts) - self.recv_counts[rank]
        self.mask = cp_mask(pattern, positions_RT[rank], keys_K, doc_ids_BS, flex, block_size)

    def gather(self, x_BGTE: Tensor) -> Tensor:
        """(B, G, T, E) rows of this rank -> (B, G, K, E) rows its queries need; gradients flow back to the owners."""
        x_TBGE = x_BGTE.permute(2, 0, 1, 3)
        if self.send_rows is None:
            x_KBGE = funcol.all_gather_single(x_TBGE.contiguous(), 0, self.group)
        else:
            x_KBGE = funcol.all_to_all_single(x_TBGE[self.send_rows].contiguous(), self.recv_counts, self.send_counts,
                                              self.group)
        return x_KBGE.permute(1, 2, 0, 3)

    def attend(self, q_BHTE: Tensor, k_BGTE: Tensor, v_BGTE: Tensor) -> Tensor:
        """(B, H, T, E): this rank's rows of the single-process attention with this kind's mask."""
        k_BGKE, v_BGKE = self.gather(torch.cat([k_BGTE, v_BGTE], dim=-1)).chunk(2, dim=-1)  # one exchange for both
        return attend(q_BHTE, k_BGKE, v_BGKE, self.mask)

    def bytes_received(self, k_BGTE: Tensor) -> int:
        """K and V bytes this rank receives from other ranks in one layer's forward (backward sends as many back)."""
        return 2 * self.remote_rows * k_BGTE[:, :, 0].numel() * k_BGTE.element_size()


# ------------------------------------------------------------------------------------------------ the model
def cp_masks(model: Transformer, seq_len: int, group, doc_ids_BS: Tensor | None = None,
             device=None) -> dict[str, CPAttention]:
    """One CPAttention per attention kind of the model, flex where model.flex_for picks it for this rank's tokens."""
    T = seq_len // dist.get_world_size(group)
    flex = model.flex_for(T, device)
    return {kind: CPAttention(model.cfg.pattern(kind), seq_len, group, doc_ids_BS, flex, model.cfg.mask_block, device)
            for kind in set(model.cfg.attn)}


def cp_forward(model: Transformer, tokens_BT: Tensor, group, doc_ids_BS: Tensor | None = None,
               targets_BT: Tensor | None = None, loss_chunk: int = 4096) -> Tensor:
    """(B, T, V): this rank's rows of model(tokens_BS, doc_ids=doc_ids_BS), given tokens_BT = shard(tokens_BS, group).
    doc_ids_BS is the whole sequence's (every rank has it). The model may be FSDP-sharded and checkpoint-wrapped.
    targets_BT (this rank's shard of the targets): instead of logits, their summed cross-entropy, made loss_chunk
    tokens at a time as model.forward does (cp_mean turns it into this rank's share of the mean)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    T, device = tokens_BT.shape[1], tokens_BT.device
    if T * cp > model.cfg.max_seq_len:
        raise UserError(f"{T * cp} tokens exceed the model's max_seq_len={model.cfg.max_seq_len}; shorten the input "
                        "or raise max_seq_len.")
    positions = zigzag_positions(T * cp, cp, rank, device)  # (T,)
    if doc_ids_BS is not None:
        positions = positions - document_starts(doc_ids_BS)[:, positions]  # (B, T), restart with every document
    return model(tokens_BT, positions=positions, masks=cp_masks(model, T * cp, group, doc_ids_BS, device),
                 targets=targets_BT, loss_chunk=loss_chunk)


def cp_mean(loss_sum: Tensor, targets_BT: Tensor, group) -> Tensor:
    """This rank's share of the mean next-token loss, from the summed loss over its shard of the targets (-100
    ignored), scaled so that its mean over the CP group, and so FSDP's gradient averaging, gives the single-process
    mean over all S tokens."""
    count = (targets_BT != -100).sum()
    dist.all_reduce(count, group=group)
    return loss_sum * dist.get_world_size(group) / count.clamp(min=1)
