"""masks.py against independent references: hand-written inequalities, create_block_mask, and SDPA with a dense mask."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from masks import KINDS, Pattern, block_mask, dense_mask, document_starts, make_pattern, render, shifted


def reference(pattern: Pattern, q: int, k: int) -> bool:
    """The paper's patterns, written out token by token."""
    if k > q:
        return False
    if pattern.kind == "sink_window":
        return k < pattern.n_sink or q - k < pattern.window
    if pattern.kind == "strided":
        qb, kb = q // pattern.block, k // pattern.block
        return qb - kb < pattern.local_blocks or (kb + 1) % pattern.stride == 0
    return True


patterns = st.builds(make_pattern, kind=st.sampled_from(KINDS), n_sink=st.integers(0, 40), window=st.integers(1, 90),
                     block=st.integers(1, 24), local_blocks=st.integers(1, 5), stride=st.integers(1, 6))
block_sizes = st.sampled_from([16, 32, (16, 32), (32, 16)])


@settings(max_examples=60, deadline=None)
@given(pattern=patterns, n=st.integers(1, 160), q_offset=st.integers(0, 60))
def test_mask_mod_is_the_stated_inequality(pattern, n, q_offset):
    mask = dense_mask(pattern, n, n + q_offset, q_offset=q_offset)[0, 0]
    expected = torch.tensor([[reference(pattern, q + q_offset, k) for k in range(n + q_offset)] for q in range(n)])
    assert torch.equal(mask, expected)


@settings(max_examples=60, deadline=None)
@given(pattern=patterns, n=st.integers(1, 300))
def test_pairs_counts_the_allowed_pairs(pattern, n):
    assert pattern.pairs(n) == int(dense_mask(pattern, n, n).sum())


@settings(max_examples=150, deadline=None)
@given(pattern=patterns, q_len=st.integers(1, 300), q_offset=st.integers(0, 200), bs=block_sizes,
       use_offset=st.booleans())
def test_block_builder_equals_create_block_mask(pattern, q_len, q_offset, bs, use_offset):
    q_offset = q_offset if use_offset else 0
    kv_len = q_len + q_offset
    ours = block_mask(pattern, q_len, kv_len, q_offset=q_offset, block_size=bs)
    mask_mod = shifted(pattern.mask_mod(), q_offset) if q_offset else pattern.mask_mod()
    ref = create_block_mask(mask_mod, 1, 1, q_len, kv_len, device="cpu", BLOCK_SIZE=bs)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)  # the same partial blocks ...
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)  # ... and the same full ones
    assert ours.sparsity() == ref.sparsity()


def expand_blocks(bm, q_len, kv_len):
    """Token-level mask a BlockMask stands for: full blocks, and partial blocks filtered by its mask_mod."""
    QB, KB = bm.BLOCK_SIZE
    B, _, NQ = bm.kv_num_blocks.shape
    NK = bm.kv_indices.shape[-1]
    full = torch.zeros(B, NQ, NK, dtype=torch.bool)
    partial = torch.zeros(B, NQ, NK, dtype=torch.bool)
    for b in range(B):
        for i in range(NQ):
            full[b, i, bm.full_kv_indices[b, 0, i, :bm.full_kv_num_blocks[b, 0, i]].long()] = True
            partial[b, i, bm.kv_indices[b, 0, i, :bm.kv_num_blocks[b, 0, i]].long()] = True
    up = lambda m: m.repeat_interleave(QB, 1).repeat_interleave(KB, 2)[:, :q_len, :kv_len]  # noqa: E731
    from torch.nn.attention.flex_attention import create_mask
    mod = create_mask(bm.mask_mod, B, 1, q_len, kv_len, "cpu")[:, 0]
    return up(full) | (up(partial) & mod), up(full)


@settings(max_examples=80, deadline=None)
@given(pattern=patterns, data=st.data(), bs=block_sizes)
def test_document_block_masks_are_exact(pattern, data, bs):
    B, S = 2, data.draw(st.integers(1, 200))
    docs = torch.stack([torch.sort(torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=S, max_size=S))))
                        .values for _ in range(B)])
    q_offset = data.draw(st.integers(0, S - 1))
    q_len = S - q_offset
    ours = block_mask(pattern, q_len, S, batch=B, q_offset=q_offset, doc_ids=docs, block_size=bs)
    dense = dense_mask(pattern, q_len, S, batch=B, q_offset=q_offset, doc_ids=docs)[:, 0]
    effective, full = expand_blocks(ours, q_len, S)
    assert torch.equal(effective, dense)  # exact at token level
    assert not (full & ~dense).any()  # a block marked full never holds a masked pair
    ref = create_block_mask(ours.mask_mod, B, 1, q_len, S, device="cpu", BLOCK_SIZE=bs)
    assert (ours.to_dense() >= ref.to_dense()).all()  # every block create_block_mask keeps is kept


def test_documents_are_attended_alone():
    """A packed document sees the same pattern as it would alone, at its own positions."""
    pattern = make_pattern("strided", block=4, local_blocks=2, stride=3)
    docs = torch.tensor([[0] * 37 + [1] * 50])
    packed = dense_mask(pattern, 87, 87, doc_ids=docs)[0, 0]
    assert torch.equal(packed[37:, 37:], dense_mask(pattern, 50, 50)[0, 0])
    assert not packed[37:, :37].any() and not packed[:37, 37:].any()
    assert torch.equal(document_starts(docs)[0], torch.tensor([0] * 37 + [37] * 50))


def test_128k_block_mask_is_built_at_block_level():
    """At 128K the S x S grid would be 16 G entries; the block rules give the paper's structure directly."""
    S, bs = 128 * 1024, 128
    sw = block_mask(make_pattern("sink_window", n_sink=64, window=2048), S, S, block_size=bs)
    rows = slice(17, None)  # past the first window, each query tile keeps: sink tile + 15 full tiles + 2 partial edges
    assert (sw.kv_num_blocks[0, 0, rows] == 3).all() and (sw.full_kv_num_blocks[0, 0, rows] == 15).all()
    st_ = block_mask(make_pattern("strided", block=64, local_blocks=16, stride=64), S, S, block_size=bs)
    kept = st_.kv_num_blocks + st_.full_kv_num_blocks  # tiles per query tile: 8-9 local + one per 32 tiles of past
    last = S // bs - 1
    assert kept[0, 0, last] == 9 + (last - 8) // 32  # tiles t < last - 8 with (t + 1) % 32 == 0


@settings(max_examples=5, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 1000))
def test_flex_eager_equals_dense_sdpa_with_gqa(kind, seed):
    torch.manual_seed(seed)
    pattern = make_pattern(kind, n_sink=4, window=40, block=8, local_blocks=2, stride=3)
    B, H, G, S, E = 2, 4, 2, 150, 16
    q, k, v = torch.randn(B, H, S, E), torch.randn(B, G, S, E), torch.randn(B, G, S, E)
    docs = torch.sort(torch.randint(0, 3, (B, S)), dim=-1).values
    for doc_ids in (None, docs):
        bm = block_mask(pattern, S, S, batch=B, doc_ids=doc_ids, block_size=32)
        dense = dense_mask(pattern, S, S, batch=B, doc_ids=doc_ids)
        out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_compiled_on_cpu_equals_dense_sdpa():
    """Compiled flex (CPU inductor) with our block masks, one compile per kind, then new parameters reuse it."""
    import torch._dynamo

    compiled = torch.compile(flex_attention, dynamic=False)
    B, H, G, S, E = 1, 4, 2, 256, 16
    q, k, v = torch.randn(B, H, S, E), torch.randn(B, G, S, E), torch.randn(B, G, S, E)
    for kind in KINDS:
        for i, pattern in enumerate([make_pattern(kind, n_sink=4, window=40, block=8, local_blocks=2, stride=3),
                                     make_pattern(kind, n_sink=9, window=70, block=16, local_blocks=3, stride=2)]):
            with torch._dynamo.config.patch(error_on_recompile=i > 0):  # new values must not recompile
                out = compiled(q, k, v, block_mask=block_mask(pattern, S, S, block_size=32), enable_gqa=True)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(pattern, S, S), enable_gqa=True)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_render_writes_a_png(tmp_path):
    render(tmp_path / "patterns.png", seq_len=64)
    assert (tmp_path / "patterns.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@settings(max_examples=60, deadline=None)
@given(pattern=patterns)
def test_reach_is_the_longest_causal_prefix(pattern):
    """Up to reach() tokens the pattern allows every causal pair (so SDPA's causal kernel may run it); one more token
    and it does not."""
    reach = pattern.reach()
    n = min(reach, 160)
    assert torch.equal(dense_mask(pattern, n, n)[0, 0], torch.ones(n, n, dtype=torch.bool).tril())
    if reach < 160:
        assert not torch.equal(dense_mask(pattern, reach + 1, reach + 1)[0, 0],
                               torch.ones(reach + 1, reach + 1, dtype=torch.bool).tril())
