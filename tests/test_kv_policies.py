"""The post-hoc KV-reduction baselines: each keeps exactly its budget, picks what its paper says, and is full
attention when the budget covers the whole sequence."""
import pytest
import torch

from kv_policies import ScoredDecoder, attention_with_scores, generate, streaming_config
from masks import dense_mask
from model import build, init_weights, preset


def tiny():
    torch.manual_seed(0)
    model = build(preset("tiny"))  # every layer full: the model the baselines are applied to
    init_weights(model, std=0.08)
    return model.eval()


def test_attention_scores_are_the_attention_each_key_receives():
    torch.manual_seed(1)
    H, G, S, E = 4, 2, 37, 8
    q, k, v = torch.randn(H, S, E), torch.randn(G, S, E), torch.randn(G, S, E)
    pos = torch.arange(S)
    out, score = attention_with_scores(q, k, v, pos, pos, score_from=30, chunk=8)
    kk = k.repeat_interleave(2, 0)
    probs = ((q @ kk.transpose(1, 2)) / E ** 0.5).masked_fill(torch.ones(S, S).triu(1).bool(), -torch.inf).softmax(-1)
    torch.testing.assert_close(out, probs @ v.repeat_interleave(2, 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score, probs[:, 30:].sum(1).view(G, 2, S).sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_full_budget_is_full_attention(policy):
    model = tiny()
    prompt = torch.randint(0, 512, (60,)).tolist()
    decoder = ScoredDecoder(model, policy, budget=200, window=8)
    tokens, logits = [], [decoder.prefill(prompt)]
    for _ in range(20):
        tokens.append(int(logits[-1].argmax()))
        logits.append(decoder.step(tokens[-1]))
    with torch.no_grad():
        reference = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:]
    torch.testing.assert_close(torch.stack(logits), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_scored_caches_keep_exactly_the_budget(policy):
    model = tiny()
    budget = 24
    decoder = ScoredDecoder(model, policy, budget, window=8)
    logits = decoder.prefill(torch.randint(0, 512, (100,)).tolist())
    for step in range(30):
        for cache in decoder.caches:
            assert cache.k.shape[1] == cache.v.shape[1] == cache.pos.shape[1] == budget
            kept = cache.pos  # (G, budget): the recent tokens are always there, nothing twice
            assert (kept[:, -decoder.recent:] == torch.arange(100 + step - decoder.recent, 100 + step)).all()
            assert all(len(set(row.tolist())) == budget for row in kept)
        logits = decoder.step(int(logits.argmax()))


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_prompt_tokens_kept_are_the_best_scored(policy):
    """The prompt pass is full attention whatever the budget, so an unlimited run gives every token's score: the
    kept tokens outside the recent window must be exactly the best-scored ones."""
    model = tiny()
    prompt = torch.randint(0, 512, (80,)).tolist()
    everything = ScoredDecoder(model, policy, budget=1000, window=8)
    everything.prefill(prompt)
    cut = ScoredDecoder(model, policy, budget=20, window=8)
    cut.prefill(prompt)
    n_old = 20 - cut.recent
    for full, kept in zip(everything.caches, cut.caches):
        best = full.score[:, :80 - cut.recent].topk(n_old, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(kept.pos[:, :n_old], best)


def test_streaming_is_sink_plus_recent():
    cfg = streaming_config(preset("tiny"), budget=20)
    mask = dense_mask(cfg.pattern("sink_window"), 100, 100)[0, 0]
    assert (mask.sum(-1)[20:] == 20).all()  # every query past the budget reads exactly 20 keys
    assert mask[99, :4].all() and mask[99, 84:].all() and not mask[99, 4:84].any()  # 4 sinks + the last 16


def test_generate_stops_at_a_stop_token():
    model = tiny()
    prompt = torch.randint(0, 512, (40,)).tolist()
    first = generate(model, prompt, 1, "snapkv", 16)
    assert generate(model, prompt, 10, "snapkv", 16, stop_ids={first[0]}) == first
