"""The compacted cache against a full recompute: the same logits and the same greedy tokens, whatever the layout,
prompt lengths, chunking and ring wrap-around."""
import pytest
import torch
import torch.nn.functional as F
from conftest import needs_cuda

import longgen
from cache import Cache
from generate import compiled_decode, decode_one, generate, prefill
from model import build, init_weights, preset

# tiny: n_sink 4, window 24, block 8, local_blocks 2, stride 4 (a kept block every 32 tokens)
LAYOUTS = {
    "sink_window": ("sink_window",) * 6,
    "strided": ("strided",) * 6,
    "full": ("full",) * 6,
    "longgen": longgen.longgen_layout(6, sparse="sink_window"),
    "longgen_strided": longgen.longgen_layout(6, sparse="strided"),
}


def tiny(layout: str, **overrides):
    torch.manual_seed(0)
    model = build(preset("tiny", layer_kinds=LAYOUTS[layout], **overrides))
    init_weights(model, std=0.08)  # peaked logits: no near-ties for greedy decoding to trip on
    return model.eval()


@torch.no_grad()
def cached_run(model, prompts, n_new, chunk, decode=decode_one, flex_decode=()):
    """Greedy decoding through the cache; the logits of every step, (B, n_new, V), and the tokens (B, n_new)."""
    device = model.tok_embeddings.weight.device
    cache = Cache(model.cfg, len(prompts), max(map(len, prompts)) + n_new, device, flex_decode=flex_decode)
    if decode is not decode_one:
        cache.mark_static()
    logits, steps = prefill(model, cache, prompts, chunk), []
    for i in range(n_new):
        steps.append(logits.clone())  # a CUDA graph's output is overwritten by its next replay
        if i < n_new - 1:
            logits = decode(model, cache, logits.argmax(-1))
    logits = torch.stack(steps, dim=1)
    return logits, logits.argmax(-1)


@torch.no_grad()
def recomputed(model, prompt, tokens):
    """Logits after each prefix of prompt + tokens, each from one pass over the whole sequence (no cache)."""
    seq = torch.tensor([list(prompt) + tokens.tolist()], device=model.tok_embeddings.weight.device)
    return model(seq)[0, len(prompt) - 1:-1]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("length, chunk", [(5, 4096), (24, 7), (28, 1), (100, 16), (100, 4096), (131, 37)])
def test_cached_greedy_equals_full_recompute(layout, length, chunk):
    model = tiny(layout)
    torch.manual_seed(length)
    prompt = torch.randint(0, 512, (length,)).tolist()
    logits, tokens = cached_run(model, [prompt], 70, chunk)  # 70 new tokens: the rings wrap several times
    reference = recomputed(model, prompt, tokens[0])
    torch.testing.assert_close(logits[0], reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens[0], reference.argmax(-1))


@pytest.mark.parametrize("layout", ["longgen", "longgen_strided", "full"])
@pytest.mark.parametrize("chunk", [16, 4096])  # 4096: a first chunk past the reach, its rows of different lengths
def test_batch_of_different_lengths(layout, chunk):
    model = tiny(layout)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (3, 57, 100, 24)]
    logits, tokens = cached_run(model, prompts, 50, chunk=chunk)
    for row, prompt in enumerate(prompts):
        reference = recomputed(model, prompt, tokens[row])
        torch.testing.assert_close(logits[row], reference, atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[row], reference.argmax(-1))


def test_compiled_decode_never_recompiles_across_ring_wraps():
    """One compiled step serves every position: the position is a tensor, the buffers never change shape."""
    import torch._dynamo

    model = tiny("longgen_strided")  # strided rings and kept blocks beside full layers
    prompt = torch.randint(0, 512, (30,)).tolist()
    decode = compiled_decode("cpu")
    expected, _ = cached_run(model, [prompt], 3, chunk=8)
    with torch.no_grad():
        cache = Cache(model.cfg, 1, 30 + 80)
        logits = prefill(model, cache, [prompt], 8)
        steps = [logits]
        logits = decode(model, cache, logits.argmax(-1))  # the first call compiles
        steps.append(logits)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(75):  # past two stride periods and many ring wraps
                logits = decode(model, cache, logits.argmax(-1))
                steps.append(logits)
    tokens = torch.stack(steps, dim=1).argmax(-1)
    torch.testing.assert_close(torch.stack(steps[:3], dim=1), expected, atol=1e-4, rtol=1e-4)
    reference = recomputed(model, prompt, tokens[0])
    torch.testing.assert_close(torch.stack(steps, dim=1)[0], reference, atol=1e-4, rtol=1e-4)


def test_sparse_caches_are_compact():
    """sink_window keeps n_sink + window slots whatever the length; strided grows as length / stride."""
    cfg = longgen.convert(preset("tiny", max_seq_len=100_000), sparse="sink_window")
    for max_len in (1000, 100_000):
        cache = Cache(cfg, 1, max_len)
        assert cache.kinds["sink_window"].capacity == 128  # 4 + 24, rounded up to the 128-slot tile
        assert cache.kinds["full"].capacity == -(-max_len // 128) * 128
    strided = Cache(longgen.convert(cfg, sparse="strided"), 1, 100_000).kinds["strided"]
    assert strided.capacity == -(-(16 + (100_000 // 8 // 4) * 8) // 128) * 128  # 2 local blocks + every 4th block
    cache = Cache(cfg, 2, 100_000)
    held = sum(cache.nbytes().values())
    expected = 2 * 2 * 2 * 16 * 4 * (2 * 100_096 + 4 * 128)  # (k, v) x B x G x E x fp32 x (2 full + 4 sparse) slots
    assert held == expected and cache.full_attention_nbytes() == 2 * 2 * 2 * 16 * 4 * 6 * 100_096


def test_generate_stops_at_stop_tokens_and_reports_stats():
    model = tiny("longgen")
    stats = {}
    prompt = torch.randint(0, 512, (20,)).tolist()
    first = next(generate(model, [prompt], 5))
    steps = list(generate(model, [prompt], 30, stop_ids={int(first)}, stats=stats))
    assert len(steps) == 1 and torch.equal(steps[0], first)
    assert stats["new_tokens"] == 1 and stats["prompt_tokens"] == 20 and stats["prefill_s"] > 0


@needs_cuda
@pytest.mark.parametrize("flex_decode", [(), ("full", "sink_window", "strided")])
@pytest.mark.parametrize("layout", ["longgen", "longgen_strided"])
def test_gpu_flex_prefill_and_cuda_graph_decode_equal_recompute(layout, flex_decode):
    """On GPU: prefill chunks of >= 128 tokens go through flex with the cache's block masks, decoding through the
    compiled CUDA-graph step, with SDPA (the default) or flex decoding."""
    model = tiny(layout).cuda()
    torch.manual_seed(2)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (300, 170)]
    logits, tokens = cached_run(model, prompts, 60, chunk=128, decode=compiled_decode("cuda"), flex_decode=flex_decode)
    for row, prompt in enumerate(prompts):
        reference = recomputed(model, prompt, tokens[row].cpu())
        torch.testing.assert_close(logits[row], reference, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("layout", ["sink_window", "strided"])
def test_first_chunk_takes_the_full_layers_kernel_where_the_pattern_is_causal(layout, monkeypatch):
    """A sparse layer's first chunk within its pattern's reach (tiny: sink_window 4 + 24 = 28 tokens, strided 2 x 8 =
    16) runs SDPA's causal kernel on the chunk alone, as a full layer; one token more and it takes the pattern's mask over
    [cache | chunk]. Logits and greedy tokens equal a full recompute either way."""
    model = tiny(layout)
    reach = int(model.cfg.pattern(layout).reach())
    real, calls = F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((q.shape[2], k.shape[2], attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    for length, expected in ((reach, [(reach, reach, True, True)]),
                             (reach + 1, [(reach + 1, False, False)])):  # the pattern's mask over [cache | chunk]
        torch.manual_seed(length)
        prompt = torch.randint(0, 512, (length,)).tolist()
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        calls.clear()
        with torch.no_grad():
            prefill(model, Cache(model.cfg, 1, length + 1), [prompt], 4096)
        monkeypatch.setattr(F, "scaled_dot_product_attention", real)
        seen = calls if length == reach else [(q, no_mask, causal) for q, _, no_mask, causal in calls]
        assert seen == expected * 6, length
        logits, tokens = cached_run(model, [prompt], 30, 4096)
        reference = recomputed(model, prompt, tokens[0])
        torch.testing.assert_close(logits[0], reference, atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[0], reference.argmax(-1))




@pytest.mark.parametrize("layout, in_place", [("sink_window", 4 + 24), ("strided", 2 * 8)])
def test_chunks_before_the_first_eviction_are_written_in_place(layout, in_place):
    """Until a sparse kind evicts (tiny: sink_window's first 4 + 24 positions, strided's ring of 2 blocks of 8 sit at
    their own slots) its chunks are written in place as a full layer's are, with no eviction plan; the chunk that
    crosses that line takes the plan. Logits and greedy tokens equal a full recompute."""
    model = tiny(layout)
    cache = Cache(model.cfg, 1, 200)
    assert cache.kinds[layout].in_place == in_place
    prompt = torch.randint(0, 512, (in_place + 5,), generator=torch.Generator().manual_seed(1)).tolist()
    plans, real = [], cache.advance

    def spy(T):
        plans.append(cache._plans[layout] is None)
        real(T)

    cache.advance = spy
    with torch.no_grad():
        prefill(model, cache, [prompt], 4)
    assert plans == [4 * (i + 1) <= in_place for i in range(len(plans))]
    logits, tokens = cached_run(model, [prompt], 20, 4)
    reference = recomputed(model, prompt, tokens[0])
    torch.testing.assert_close(logits[0], reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens[0], reference.argmax(-1))
