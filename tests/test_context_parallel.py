"""context_parallel.py on CPUs: 2 and 4 gloo processes against one process running model.py, for every layer kind."""
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import longgen
from context_parallel import (CPAttention, cp_forward, cp_mean, cp_mask, needed_keys, shard, unshard,
                              zigzag_positions)
from masks import Pattern
from model import build, preset

S, BATCH = 128, 2  # 4 ranks: chunks of 16 tokens, so a 24-token window reaches into two other ranks' chunks


def cases() -> dict:
    """name -> (config, tokens (B, S), doc_ids (B, S) or None)."""
    tiny = preset("tiny")
    docs = torch.tensor([[0] * 40 + [1] * 50 + [2] * 38, [0] * 100 + [1] * 28])
    return {
        "full": (tiny, None),
        "sink_window": (replace(tiny, attn=("sink_window",) * tiny.n_layers), None),
        "strided": (replace(tiny, attn=("strided",) * tiny.n_layers), None),
        "longgen": (longgen.convert(tiny, sparse="sink_window"), None),
        "longgen_strided_documents": (longgen.convert(tiny, sparse="strided"), docs),
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
        for name, (cfg, state_dict, tokens, doc_ids) in inputs.items():
            model = build(cfg, state_dict)
            logits = cp_forward(model, shard(tokens, group), group, doc_ids)
            targets = shard(targets_of(tokens, doc_ids), group)
            # the loss as train.py makes it: summed 5 tokens at a time (a chunk that does not divide the shard)
            loss = cp_mean(cp_forward(model, shard(tokens, group), group, doc_ids, targets, loss_chunk=5), targets,
                           group)
            loss.backward()
            loss, grads = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
            for t in [loss, *grads.values()]:
                dist.all_reduce(t, group=group)  # sum (gloo has no average) ...
                t /= cp  # ... then mean, as FSDP averages gradients over the CP ranks
            results[name] = dict(logits=unshard(logits.detach(), group), loss=loss, grads=grads)
        k_BGTE = torch.zeros(BATCH, 2, S // cp, 16)
        results["bytes"] = {kind: CPAttention(preset("tiny").pattern(kind), S, group).bytes_received(k_BGTE)
                            for kind in ("full", "sink_window", "strided")}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    return {name: (cfg, build(cfg).state_dict(), torch.randint(0, cfg.vocab_size, (BATCH, S)), docs)
            for name, (cfg, docs) in cases().items()}


@pytest.fixture(scope="module")
def reference(inputs):
    """Logits, loss and gradients of one process running model.py."""
    out = {}
    for name, (cfg, state_dict, tokens, doc_ids) in inputs.items():
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
@pytest.mark.parametrize("keys", ["all_gather", "scattered"])
def test_flex_block_mask_equals_dense_mask(kind, keys):
    """The GPU path's BlockMask for one rank's queries: the same attention as SDPA with the dense mask (eager flex),
    no tile it skips holds an allowed pair, no tile it marks full a masked one, and with the all-gather's key layout
    (contiguous tiles) its tiles are exactly those of the dense mask."""
    torch.manual_seed(0)
    pattern, cp, S_long, tile = Pattern(kind, n_sink=4, window=300, block=32, local_blocks=8, stride=4), 4, 1024, 128
    q_pos = zigzag_positions(S_long, cp, 1)  # chunks 1 and 6 of 8, 256 queries
    k_pos = (torch.cat([zigzag_positions(S_long, cp, r) for r in range(cp)]) if keys == "all_gather"
             else torch.arange(S_long)[::3])  # 342 keys: tiles span gaps and are cut short at the end
    q, k, v = torch.randn(1, 4, len(q_pos), 16), torch.randn(1, 2, len(k_pos), 16), torch.randn(1, 2, len(k_pos), 16)
    dense, block_mask = cp_mask(pattern, q_pos, k_pos), cp_mask(pattern, q_pos, k_pos, flex=True, block_size=tile)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True), expected,
                               atol=1e-5, rtol=1e-5)
    kept = block_mask.to_dense()[0, 0].bool()  # partial or full tiles
    full = torch.zeros_like(kept)
    for i, (n, idx) in enumerate(zip(block_mask.full_kv_num_blocks[0, 0], block_mask.full_kv_indices[0, 0])):
        full[i, idx[:n].long()] = True
    any_, all_ = tiles(dense[0, 0], tile)
    assert (kept | ~any_).all() and (all_ | ~full).all()
    if keys == "all_gather":
        assert torch.equal(kept, any_) and torch.equal(full, all_)
