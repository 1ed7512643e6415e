"""The post-hoc KV-reduction baselines: each keeps exactly its budget, picks what its paper says, and is full
attention when the budget covers the whole sequence."""
import pytest
import torch
import torch.nn.functional as F

from evaluation.kv_policies import ScoredDecoder, attend_one, generate, received_attention, streaming_config
from masks import dense_mask
from model import build, init_weights, preset, rope_angles, rope_frequencies


def tiny():
    torch.manual_seed(0)
    model = build(preset("tiny"))  # every layer full: the model the baselines are applied to
    init_weights(model, std=0.08)
    return model.eval()


def test_attention_scores_are_the_attention_each_key_receives():
    torch.manual_seed(1)
    H, G, S, E = 4, 2, 37, 8
    q, k, v = torch.randn(H, S, E), torch.randn(G, S, E), torch.randn(G, S, E)
    kk = k.repeat_interleave(2, 0)
    probs = ((q @ kk.transpose(1, 2)) / E ** 0.5).masked_fill(torch.ones(S, S).triu(1).bool(), -torch.inf).softmax(-1)
    score = received_attention(q[:, 30:], k, 30, chunk=3)  # the last 7 queries, in chunks of 3
    torch.testing.assert_close(score, probs[:, 30:].sum(1).view(G, 2, S).sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received_attention(q, k, 0, chunk=8), probs.sum(1).view(G, 2, S).sum(1))
    out, score = attend_one(q[:, -1:], k, v)  # the last query sees every key
    torch.testing.assert_close(out, probs[:, -1:] @ v.repeat_interleave(2, 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score, probs[:, -1].view(G, 2, S).sum(1), atol=1e-5, rtol=1e-5)


class OldDecoder:
    """The first implementation, kept as the reference: fp32 attention probabilities for every query chunk, and
    decoding steps that concatenate the new token and gather the kept ones."""

    def __init__(self, model, policy, budget, window=8, pool=7):
        self.model, self.policy, self.budget, self.pool = model, policy, budget, pool
        self.recent = budget // 2 if policy == "h2o" else min(window, budget)
        self.G, self.caches = model.cfg.n_kv_heads, []

    @staticmethod
    def attention(q, k, v, q_pos, k_pos, score_from=0, chunk=16):
        H, G = q.shape[0], k.shape[0]
        k, v = k.repeat_interleave(H // G, 0), v.repeat_interleave(H // G, 0)
        outs, scores = [], torch.zeros(G, k.shape[1])
        for a in range(0, q.shape[1], chunk):
            logits = (q[:, a:a + chunk].float() @ k.float().transpose(1, 2)) / q.shape[-1] ** 0.5
            if k_pos is not None:
                logits = logits.masked_fill(k_pos[None, None, :] > q_pos[None, a:a + chunk, None], float("-inf"))
            probs = logits.softmax(dim=-1)
            outs.append((probs @ v.float()).to(q.dtype))
            scores += probs[:, max(score_from - a, 0):].sum(dim=1).view(G, H // G, -1).sum(dim=1)
        return torch.cat(outs, dim=1), scores

    def keep(self, c, idx):
        idx = idx.sort(dim=-1).values
        c["k"], c["v"] = (c[n].gather(1, idx[..., None].expand(-1, -1, c[n].shape[-1])) for n in "kv")
        c["pos"], c["score"] = c["pos"].gather(1, idx), c["score"].gather(1, idx)

    def run(self, prompt, steps):
        model, S, G = self.model, len(prompt), self.G
        pos = torch.arange(S)
        h = model.tok_embeddings(torch.tensor([prompt]))
        inv_freq = rope_frequencies(model.cfg)
        rope = rope_angles(inv_freq, pos, h.dtype)
        for layer in model.layers:
            q, k, v = (t[0] for t in layer.attention.qkv(layer.attention_norm(h), rope))
            out, score = self.attention(q, k, v, pos, pos, score_from=0 if self.policy == "h2o" else S - self.recent)
            h = layer.after_attention(h, layer.attention.out(out[None]))
            if self.policy == "snapkv":
                score = F.avg_pool1d(score[:, None], self.pool, stride=1, padding=self.pool // 2,
                                     count_include_pad=False)[:, 0]
            c = dict(k=k, v=v, pos=pos.expand(G, S).clone(), score=score)
            if S > self.budget:
                best = score[:, :S - self.recent].topk(self.budget - self.recent, dim=-1).indices
                self.keep(c, torch.cat([best, torch.arange(S - self.recent, S).expand(G, -1)], 1))
            self.caches.append(c)
        logits, kept = [model.output(model.norm(h[0, -1]))], [torch.stack([c["pos"] for c in self.caches])]
        for step in range(steps):
            p = torch.tensor([S + step])
            h = model.tok_embeddings(torch.tensor([[int(logits[-1].argmax())]]))
            rope = rope_angles(inv_freq, p, h.dtype)
            for layer, c in zip(model.layers, self.caches):
                q, k, v = (t[0] for t in layer.attention.qkv(layer.attention_norm(h), rope))
                c["k"], c["v"] = torch.cat([c["k"], k], 1), torch.cat([c["v"], v], 1)
                c["pos"], c["score"] = torch.cat([c["pos"], p.expand(G, 1)], 1), torch.cat([c["score"],
                                                                                           torch.zeros(G, 1)], 1)
                out, score = self.attention(q, c["k"], c["v"], p, None)
                c["score"] += score
                h = layer.after_attention(h, layer.attention.out(out[None]))
                n = c["k"].shape[1]
                if n > self.budget:
                    victim = c["score"][:, :n - self.recent].argmin(dim=-1, keepdim=True)
                    everything = torch.arange(n).expand(G, n)
                    self.keep(c, everything[everything != victim].view(G, n - 1))
            logits.append(model.output(model.norm(h[0, 0])))
            kept.append(torch.stack([c["pos"] for c in self.caches]))
        return torch.stack(logits), kept


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_same_kept_tokens_and_logits_as_the_first_implementation(policy):
    """The SDPA prefill with scores from the scored queries alone, and decoding in place, keep the same tokens as
    the exact fp32 computation over every query chunk with concatenate-and-gather steps (OldDecoder above)."""
    model = tiny()
    prompt = torch.randint(0, 512, (90,)).tolist()
    with torch.no_grad():
        reference, kept = OldDecoder(model, policy, budget=24).run(prompt, steps=30)
        decoder = ScoredDecoder(model, policy, budget=24, window=8)
        logits = [decoder.prefill(prompt)]
        for step in range(30):
            assert torch.equal(torch.stack([c.pos for c in decoder.caches]), kept[step]), f"step {step}"
            logits.append(decoder.step(int(logits[-1].argmax())))
    torch.testing.assert_close(torch.stack(logits), reference, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_compressed_before_the_question(policy):
    """question_from: the cache is cut after the context, and the question's tokens go through it as decoding steps.
    With a budget covering everything that is full attention (greedy with full recompute); with a small one the
    cache never exceeds the budget while the question streams in, and no context token dropped before it comes back.
    Shown the question instead, snapkv keeps other context tokens for another question."""
    model = tiny()
    context, question = torch.randint(0, 512, (70,)).tolist(), torch.randint(0, 512, (12,)).tolist()
    tokens = context + question
    with torch.no_grad():
        for _ in range(8):  # greedy, recomputing the whole sequence each step
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert generate(model, context + question, 8, policy, 500, question_from=70) == tokens[82:]

    other_question = torch.randint(0, 512, (12,)).tolist()
    decoder = ScoredDecoder(model, policy, budget=24, window=8)
    decoder.prefill(context)
    chosen = [set(c.pos[g].tolist()) for c in decoder.caches for g in range(c.pos.shape[0])]
    for token in question:
        decoder.step(token)
        assert all(c.pos.shape[1] == 24 for c in decoder.caches)
    now = [set(c.pos[g].tolist()) for c in decoder.caches for g in range(c.pos.shape[0])]
    assert all({p for p in after if p < 70} <= before for before, after in zip(chosen, now))  # nothing comes back
    if policy == "snapkv":
        seen = [ScoredDecoder(model, policy, budget=24, window=8) for _ in range(2)]
        for decoder, q in zip(seen, (question, other_question)):
            decoder.prefill(context + q)
        assert any(not torch.equal(a.pos[:, :16], b.pos[:, :16]) for a, b in zip(seen[0].caches, seen[1].caches))
