"""training/context_parallel.py on CPUs: 2 and 4 gloo processes against one process running model.py, for every
layer kind, with and without packed documents, for both exchanges (pattern and all-gather)."""
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import longgen
from training.context_parallel import (CPAttention, capacity, cp_forward, cp_mean, cp_mask, exchange_report,
                                       needed_keys, shard, unshard, zigzag_positions)
from masks import make_pattern
from model import build, preset

S, BATCH = 128, 2  # 4 ranks: chunks of 16 tokens, so a 24-token window reaches into two other ranks' chunks


# Documents that cross chunk and rank boundaries (chunks of 16 and 32 tokens), one that starts on a boundary (64), one
# shorter than a chunk, and a long one with kept strided blocks (stride 4 x block 8 = every 32 tokens).
DOCS = torch.tensor([[0] * 40 + [1] * 50 + [2] * 38, [0] * 5 + [1] * 59 + [2] * 12 + [3] * 52])


def cases() -> dict:
    """name -> (config, doc_ids (B, S) or None, exchange)."""
    tiny = preset("tiny")
    short = replace(tiny, n_layers=3, layer_kinds=("full",) * 3)  # LongGen: the middle layer full, the others sparse
    return {
        "full": (tiny, None, "pattern"),
        "sink_window": (replace(tiny, layer_kinds=("sink_window",) * tiny.n_layers), None, "pattern"),
        "strided": (replace(tiny, layer_kinds=("strided",) * tiny.n_layers), None, "pattern"),
        "longgen": (longgen.convert(tiny, sparse="sink_window"), None, "pattern"),
        "longgen_allgather": (longgen.convert(short, sparse="strided"), None, "allgather"),
        **{f"longgen_{sparse}_documents_{exchange}": (longgen.convert(short, sparse=sparse), DOCS, exchange)
           for sparse in ("sink_window", "strided") for exchange in ("pattern", "allgather")},
        # no sink: some pairs of ranks exchange no row at all
        "window_only_documents": (replace(tiny.with_pattern(n_sink=0), n_layers=2, layer_kinds=("sink_window",) * 2), DOCS, "pattern"),
    }


def targets_of(tokens, doc_ids):
    """The next token of every position; -100 at the end and where the next token starts another document."""
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)
    if doc_ids is not None:
        targets[:, :-1][doc_ids[:, 1:] != doc_ids[:, :-1]] = -100
    return targets


def _worker(rank, cp, port, inputs, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://localhost:{port}", rank=rank, world_size=cp)
    group, results = dist.group.WORLD, {}
    try:
        for name, (cfg, state_dict, tokens, doc_ids, exchange) in inputs.items():
            model = build(cfg, state_dict)
            logits = cp_forward(model, shard(tokens, group), group, doc_ids, exchange=exchange)
            targets = shard(targets_of(tokens, doc_ids), group)
            # the loss as train.py makes it: summed 5 tokens at a time (a chunk that does not divide the shard)
            stats = {}
            loss = cp_mean(cp_forward(model, shard(tokens, group), group, doc_ids, targets, loss_chunk=5,
                                      exchange=exchange, stats=stats), targets, group)
            loss.backward()
            loss, grads = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
            for t in [loss, *grads.values()]:
                dist.all_reduce(t, group=group)  # sum (gloo has no average) ...
                t /= cp  # ... then mean, as FSDP averages gradients over the CP ranks
            results[name] = dict(logits=unshard(logits.detach(), group), loss=loss, grads=grads,
                                 exchange=exchange_report(stats, 4, group))
        k_BGTE = torch.zeros(BATCH, 2, S // cp, 16)
        results["bytes"] = {kind: CPAttention(preset("tiny").pattern(kind), S, group).bytes_received(k_BGTE)
                            for kind in ("full", "sink_window", "strided")}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    return {name: (cfg, build(cfg).state_dict(), torch.randint(0, cfg.vocab_size, (BATCH, S)), docs, exchange)
            for name, (cfg, docs, exchange) in cases().items()}


@pytest.fixture(scope="module")
def reference(inputs):
    """Logits, loss and gradients of one process running model.py."""
    out = {}
    for name, (cfg, state_dict, tokens, doc_ids, _) in inputs.items():
        model = build(cfg, state_dict)
        logits = model(tokens, doc_ids=doc_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), targets_of(tokens, doc_ids).flatten(), ignore_index=-100)
        loss.backward()
        out[name] = dict(logits=logits.detach(), loss=loss.detach(),
                         grads={n: p.grad for n, p in model.named_parameters()})
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda cp: f"cp{cp}")
def parallel(request, inputs, tmp_path_factory):
    """Every rank's results from `cp` gloo processes."""
    cp, out_dir = request.param, tmp_path_factory.mktemp(f"cp{request.param}")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(cp, port, inputs, out_dir), nprocs=cp)
    return cp, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(cp)]


@pytest.mark.parametrize("name", list(cases()))
def test_cp_equals_one_process(parallel, reference, name):
    _, ranks = parallel
    ref = reference[name]
    for result in ranks:
        got = result[name]
        torch.testing.assert_close(got["logits"], ref["logits"], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got["loss"], ref["loss"], atol=1e-5, rtol=1e-5)
        for param, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][param], grad, atol=1e-6, rtol=1e-4, msg=param)


def test_sparse_exchange_sends_less_than_all_gather(parallel):
    cp, ranks = parallel
    all_gather = 2 * (cp - 1) * (S // cp) * BATCH * 2 * 16 * 4  # K and V rows of every other rank, float32
    for result in ranks:
        sent = result["bytes"]
        assert sent["full"] == all_gather
        assert 0 < sent["sink_window"] < all_gather and 0 < sent["strided"] < all_gather


def test_exchange_is_counted(parallel):
    """exchange_report: the pattern exchange sends at least the rows the masks need and, padding included, fewer
    than an all-gather; the all-gather exchange and full layers send every row; bytes follow from the rows."""
    cp, ranks = parallel
    T, row_bytes = S // cp, 2 * BATCH * 2 * 16 * 4  # K and V of one row: batch x 2 heads x 16 wide, float32
    for name, (cfg, docs, exchange) in cases().items():
        report = ranks[0][name]["exchange"]
        assert report == ranks[-1][name]["exchange"]  # summed over the ranks: the same on each
        assert sorted(report) == sorted(set(cfg.layer_kinds))
        for kind, r in report.items():
            assert r["layers"] == cfg.layer_kinds.count(kind)
            assert r["allgather_rows_per_layer"] == cp * (cp - 1) * T
            assert r["bytes_per_step"] == 2 * r["layers"] * r["rows_per_layer"] * row_bytes
            if kind == "full" or exchange == "allgather":
                assert r["rows_per_layer"] == r["needed_rows_per_layer"] == r["allgather_rows_per_layer"]
            else:
                assert 0 < r["needed_rows_per_layer"] <= r["rows_per_layer"] <= r["allgather_rows_per_layer"]
                assert (r["needed_rows_per_layer"] < r["rows_per_layer"]) == (docs is not None)  # padding
                # 4 ranks of 32 tokens: strided's capacity is every row (at 128K it is 3%, see the capacity test)
                if docs is None or cp == 2:
                    assert r["rows_per_layer"] < r["allgather_rows_per_layer"]


def random_documents(batch: int, length: int, median: int, generator) -> torch.Tensor:
    """(batch, length) doc_ids of documents with log-normal lengths (at least 1 token)."""
    rows = []
    for _ in range(batch):
        lengths = (median * torch.exp(torch.randn(length // median + 8, generator=generator))).long().clamp(min=1)
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        rows.append(ids[:length] if len(ids) >= length else torch.cat([ids, ids.new_full((length - len(ids),),
                                                                                          len(lengths))]))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["sink_window", "strided"])
def test_needed_keys_with_documents_are_exactly_those_the_mask_reaches(kind):
    pattern, cp, generator = preset("tiny").pattern(kind), 4, torch.Generator().manual_seed(1)
    positions_RT = torch.stack([zigzag_positions(S, cp, r) for r in range(cp)])
    for docs in [DOCS, *(random_documents(2, S, median, generator) for median in (3, 12, 30, 60))]:
        dense = cp_mask(pattern, torch.arange(S), torch.arange(S), docs)[:, 0].any(0)  # (S, S), any row of the batch
        expected = dense[positions_RT].any(1)[:, positions_RT]
        assert torch.equal(needed_keys(pattern, positions_RT, docs), expected)


@pytest.mark.parametrize("kind", ["sink_window", "strided"])
@pytest.mark.parametrize("cp", [2, 4])
def test_capacity_holds_every_placement_of_documents_at_128k(kind, cp):
    """At the paper's patterns and 128K tokens: no placement of documents needs more rows than `capacity` (documents
    of about 128 and 16K tokens, one or two rows), and what it sends is at most 5% of an all-gather (cp = 2: 3.3% sink +
    window, 3.1% strided)."""
    pattern, length, generator = preset("llama-2-7b").pattern(kind), 131072, torch.Generator().manual_seed(0)
    positions_RT = torch.stack([zigzag_positions(length, cp, r) for r in range(cp)])
    T = length // cp
    for batch in (1, 2):
        cap = capacity(pattern, positions_RT, batch)
        assert torch.equal(cap.diagonal(), torch.full((cp,), T))
        remote = cap.sum() - cap.diagonal().sum()
        assert remote <= 0.05 * batch * cp * (cp - 1) * T
        for median in (128, 16384):
            need = needed_keys(pattern, positions_RT, random_documents(batch, length, median, generator))
            assert (need.sum(-1) <= cap).all(), (median, need.sum(-1), cap)


def test_zigzag_is_a_balanced_partition():
    for cp in (2, 4):
        held = [zigzag_positions(S, cp, r) for r in range(cp)]
        assert torch.equal(torch.cat(held).sort().values, torch.arange(S))
        assert len({int((p + 1).sum()) for p in held}) == 1  # the same number of causal pairs on every rank


@pytest.mark.parametrize("kind", ["full", "sink_window", "strided"])
def test_needed_keys_are_exactly_those_the_mask_reaches(kind):
    pattern, cp = preset("tiny").pattern(kind), 4
    positions_RT = torch.stack([zigzag_positions(S, cp, r) for r in range(cp)])
    dense = cp_mask(pattern, torch.arange(S), torch.arange(S))[0, 0]  # (S, S), whole sequence
    expected = dense[positions_RT].any(1)[:, positions_RT]  # (R, R, T): does any query of dst see key t of src
    assert torch.equal(needed_keys(pattern, positions_RT), expected)


def tiles(mask_TK, tile):
    """Per tile of a token-level mask: is any pair allowed, are all (a tile cut short by the end is never all)."""
    T, K = mask_TK.shape
    padded = F.pad(mask_TK.to(torch.uint8), (0, -K % tile, 0, -T % tile)).bool()
    padded = padded.view(padded.shape[0] // tile, tile, padded.shape[1] // tile, tile)
    return padded.any(3).any(1), padded.all(3).all(1)


@pytest.mark.parametrize("kind", ["full", "sink_window", "strided"])
@pytest.mark.parametrize("keys", ["all_gather", "scattered", "documents", "documents_padded"])
def test_flex_block_mask_equals_dense_mask(kind, keys):
    """The GPU path's BlockMask for one rank's queries: the same attention as SDPA with the dense mask (eager flex),
    no tile it skips holds an allowed pair, no tile it marks full a masked one, and with the all-gather's key layout
    (contiguous tiles) without documents its tiles are exactly those of the dense mask. With padding keys (rows the
    pattern exchange sends to fill its capacity) no query sees them."""
    torch.manual_seed(0)
    pattern = make_pattern(kind, n_sink=4, window=300, block=32, local_blocks=8, stride=4)
    cp, S_long, tile = 4, 1024, 128
    q_pos = zigzag_positions(S_long, cp, 1)  # chunks 1 and 6 of 8, 256 queries
    docs, real = None, None
    if keys.startswith("documents"):  # 2 rows of documents that start inside tiles, on a tile boundary and in a gap
        docs = random_documents(2, S_long, 150, torch.Generator().manual_seed(0))
        docs[1, 384:] += 100
    k_pos = (torch.arange(S_long)[::3] if keys == "scattered"
             else torch.cat([zigzag_positions(S_long, cp, r) for r in range(cp)]))  # scattered: tiles span gaps
    if keys == "documents_padded":
        k_pos = torch.cat([k_pos[:600], k_pos[599:600].expand(40), k_pos[600:]])  # 40 copies of a key, as padding
        real = torch.ones(len(k_pos), dtype=torch.bool)
        real[600:640] = False
    batch = 1 if docs is None else 2
    q, k, v = (torch.randn(batch, heads, n, 16) for heads, n in ((4, len(q_pos)), (2, len(k_pos)), (2, len(k_pos))))
    dense = cp_mask(pattern, q_pos, k_pos, docs, k_real_K=real)
    block_mask = cp_mask(pattern, q_pos, k_pos, docs, use_flex=True, block_size=tile, k_real_K=real)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True), expected,
                               atol=1e-5, rtol=1e-5)
    if real is not None:  # the padding changes nothing: the same attention as without those keys
        plain = F.scaled_dot_product_attention(q, k[:, :, real], v[:, :, real], enable_gqa=True,
                                               attn_mask=cp_mask(pattern, q_pos, k_pos[real], docs))
        torch.testing.assert_close(expected, plain, atol=1e-5, rtol=1e-5)
    for b in range(batch):
        kept = block_mask.to_dense()[b, 0].bool()  # partial or full tiles
        full = torch.zeros_like(kept)
        for i, (n, idx) in enumerate(zip(block_mask.full_kv_num_blocks[b, 0], block_mask.full_kv_indices[b, 0])):
            full[i, idx[:n].long()] = True
        any_, all_ = tiles(dense[b, 0], tile)
        assert (kept | ~any_).all() and (all_ | ~full).all()
        if keys == "all_gather":
            assert torch.equal(kept, any_) and torch.equal(full, all_)
