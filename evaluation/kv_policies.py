"""Post-hoc KV-cache reduction: the paper's baselines, applied at inference to a model trained with every layer full,
at the same KV budget as LongGen (tokens kept per layer and head).

- streaming (StreamingLLM, Xiao et al. 2024): the first 4 tokens and the most recent budget - 4. That is the
  sink_window pattern in every layer, so it runs on the compacted cache of cache.py.
- h2o (Zhang et al. 2023): the most recent half of the budget, plus the "heavy hitters": the tokens that have received
  the most attention so far (summed over queries, and over the query heads sharing a key/value head).
- snapkv (Li et al. 2024): the attention of the prompt's last `window` queries, pooled over neighbouring keys, picks
  which prompt tokens to keep; the window itself is kept.

h2o and snapkv choose per head from attention probabilities, so they run here, eagerly, one sequence at a time. The
prompt is processed with full attention (SDPA), layer by layer, and the scores apart from it: snapkv's from the last
`window` queries alone, h2o's from every query, chunk by chunk (fp32 softmax, as exact as the model's own); the cache
is then cut to the budget. Each decoding step adds one token per head and evicts the lowest-scoring one outside the
recent window, in place (ScoredCache), so the cache never holds more than `budget` tokens. Scores keep accumulating
over decoding steps. With a budget covering the whole sequence, nothing is
evicted and the result is that of full attention. `generate(..., question_from=i)` cuts the cache after the context,
before the question at token i is read (query-agnostic; eval.py --compress-before-question).

Legend: H query heads, G key/value heads, S tokens, E head width, n tokens kept.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from model import Config, Transformer, rope_angles, rope_frequencies

POLICIES = ("none", "streaming", "h2o", "snapkv")
N_SINK = 4  # StreamingLLM's attention sinks


def streaming_config(cfg: Config, budget: int) -> Config:
    """StreamingLLM at this budget: every layer sink + window."""
    return replace(cfg.with_pattern(n_sink=N_SINK, window=budget - N_SINK), layer_kinds=("sink_window",) * cfg.n_layers)


class ScoredCache:
    """One layer's kept keys and values per key/value head, with their positions and the attention they received.

    Decoding writes in place into buffers of budget + 1 slots: a step's new token goes into each head's free slot
    (the next unused one, or once the cache is full the one its last victim left), is attended to with the rest, and
    the lowest-scored token outside the recent window becomes that head's free slot. Slots are therefore not in
    position order, which attention does not care about; `k`, `v`, `pos` and `score` give the kept entries in
    position order (for inspection: decoding reads the slots)."""

    def __init__(self, k_GnE, v_GnE, pos_Gn, score_Gn, budget: int):
        G, n, _ = k_GnE.shape
        self.slots = [k_GnE, v_GnE, pos_Gn, score_Gn]  # k, v (G, size, E); pos, score (G, size)
        self._grow(min(budget + 1, n + 256))  # grows (twice as large, at most budget + 1) while the cache fills
        self.budget, self.n, self.evicting = budget, n, False  # n: slots in use; evicting: one of them is free
        self.free = torch.full((G,), n, device=k_GnE.device)  # (G,) where each head's next token goes

    def _grow(self, size: int) -> None:
        """Room for `size` slots per head (the new ones zero)."""
        self.slots = [torch.cat([t, t.new_zeros(t.shape[0], size - t.shape[1], *t.shape[2:])], 1) for t in self.slots]

    def add(self, k_G1E, v_G1E, p_1) -> None:
        """Write one token's key and value into each head's free slot, at score 0."""
        if not self.evicting and self.n == self.slots[0].shape[1]:  # out of room: twice the slots (<= budget + 1)
            self._grow(min(self.budget + 1, 2 * self.n + 1))
        k, v, pos, score = self.slots
        heads = torch.arange(k.shape[0], device=k.device)
        k[heads, self.free], v[heads, self.free] = k_G1E[:, 0], v_G1E[:, 0]
        pos[heads, self.free], score[heads, self.free] = p_1, 0.0
        if not self.evicting:
            self.n += 1
            self.free += 1

    def evict(self, newest: int, recent: int) -> None:
        """Over budget: each head frees the slot of its lowest-scored token outside the `recent` newest positions
        (up to `newest`)."""
        if self.n <= self.budget:
            return
        pos, score = self.slots[2][:, :self.n], self.slots[3][:, :self.n]
        self.free = score.masked_fill(pos > newest - recent, float("inf")).argmin(dim=-1)  # (G,)
        self.evicting = True

    def _ordered(self, i: int):
        pos = self.slots[2][:, :self.n]
        if self.evicting:  # the free slots hold evicted tokens: sort them last, and drop them
            pos = pos.scatter(1, self.free[:, None], torch.iinfo(pos.dtype).max)
        idx = pos.argsort(dim=-1)[:, :self.n - self.evicting]
        t = self.slots[i]
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]) if t.dim() == 3 else idx)

    k = property(lambda self: self._ordered(0))  # (G, kept, E), in position order
    v = property(lambda self: self._ordered(1))
    pos = property(lambda self: self._ordered(2))  # (G, kept)
    score = property(lambda self: self._ordered(3))


def received_attention(q_HTE, k_GSE, first: int, chunk: int = 1024):
    """The attention each key receives from these queries, summed over them and over the query heads of each
    key/value head: (G, S), in fp32 (softmax over every key, as in the model). The queries are at positions first,
    first + 1, ... and the keys at 0, 1, ...: causal. Chunk by chunk of queries, each against only the keys it can
    see; query heads are viewed in groups of their key/value head (no repeat of the keys)."""
    (H, T, E), G, S = q_HTE.shape, k_GSE.shape[0], k_GSE.shape[1]
    k = k_GSE.float()
    scores = torch.zeros(G, S, dtype=torch.float32, device=k.device)
    for a in range(0, T, chunk):
        c = min(chunk, T - a)
        seen = first + a + c  # keys [0, seen): the chunk's last query sees them all
        q = q_HTE[:, a:a + c].float().reshape(G, H // G * c, E)
        logits = (q @ k[:, :seen].transpose(1, 2)) / E ** 0.5  # (G, H/G * c, seen)
        future = torch.arange(seen, device=k.device) > torch.arange(first + a, seen, device=k.device)[:, None]
        logits = logits.view(G, H // G, c, seen).masked_fill_(future, float("-inf"))
        scores[:, :seen] += logits.softmax(dim=-1).sum(dim=(1, 2))
    return scores


def attend_one(q_H1E, k_GnE, v_GnE):
    """One query per head against cached keys (all in its past, so no mask): the output (H, 1, E) and the attention
    each key received, summed over the heads of its group, (G, n). Softmax in fp32, as the scores are."""
    (H, _, E), G = q_H1E.shape, k_GnE.shape[0]
    probs = ((q_H1E.float().reshape(G, H // G, E) @ k_GnE.float().transpose(1, 2)) / E ** 0.5).softmax(dim=-1)
    out = (probs @ v_GnE.float()).to(q_H1E.dtype)  # (G, H/G, E)
    return out.view(H, 1, E), probs.sum(dim=1)


class ScoredDecoder:
    """h2o or snapkv decoding of one sequence with at most `budget` cached tokens per layer and head."""

    def __init__(self, model: Transformer, policy: str, budget: int, *, window: int = 32, pool: int = 7):
        if policy not in ("h2o", "snapkv"):
            raise ValueError(f"ScoredDecoder runs h2o or snapkv, not {policy!r}")
        self.model, self.policy, self.budget, self.pool = model, policy, budget, pool
        self.recent = budget // 2 if policy == "h2o" else min(window, budget)  # never evicted
        cfg = model.cfg
        self.H, self.G, self.E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.inv_freq = rope_frequencies(cfg, model.tok_embeddings.weight.device)
        self.caches: list[ScoredCache] = []
        self.next_pos = 0

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> torch.Tensor:
        """The prompt, one layer at a time with full attention (SDPA); each layer's cache is then cut to the budget:
        the recent tokens and the best-scored of the rest. h2o scores every query's attention, snapkv only the
        last `recent` queries' (the observation window). Returns the logits after the prompt, (V,)."""
        model, device, S = self.model, self.inv_freq.device, len(prompt)
        pos = torch.arange(S, device=device)
        h = model.tok_embeddings(torch.tensor([prompt], device=device))  # (1, S, D)
        rope = rope_angles(self.inv_freq, pos, h.dtype)
        scored_from = 0 if self.policy == "h2o" else max(S - self.recent, 0)  # snapkv: the observation window
        for layer in model.layers:
            q, k, v = layer.attention.qkv(layer.attention_norm(h), rope)  # (1, H, S, E), (1, G, S, E), (1, G, S, E)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (1, H, S, E)
            h = layer.after_attention(h, layer.attention.out(out))
            q, k, v = q[0], k[0], v[0]
            score = received_attention(q[:, scored_from:], k, scored_from)  # (G, S)
            if self.policy == "snapkv":  # a key's neighbours vote with it
                score = F.avg_pool1d(score[:, None], self.pool, stride=1, padding=self.pool // 2,
                                     count_include_pad=False)[:, 0]
            pos_GS = pos.expand(self.G, S)
            if S > self.budget:  # the best-scored old tokens and the recent ones, in position order
                best = score[:, :S - self.recent].topk(self.budget - self.recent, dim=-1).indices
                idx = torch.cat([best.sort(dim=-1).values, pos[S - self.recent:].expand(self.G, -1)], 1)
                k, v = (t.gather(1, idx[..., None].expand(-1, -1, self.E)) for t in (k, v))
                pos_GS, score = pos_GS.gather(1, idx), score.gather(1, idx)
            self.caches.append(ScoredCache(k, v, pos_GS, score, self.budget))
        self.next_pos = S
        return model.output(model.norm(h[0, -1]))

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """One new token through every layer: add it to each cache, attend, evict the lowest-scored token outside
        the recent window if the cache is over budget. Returns the next logits, (V,)."""
        model, device = self.model, self.inv_freq.device
        p = torch.tensor([self.next_pos], device=device)
        h = model.tok_embeddings(torch.tensor([[token]], device=device))  # (1, 1, D)
        rope = rope_angles(self.inv_freq, p, h.dtype)
        for layer, cache in zip(model.layers, self.caches):
            q, k, v = (t[0] for t in layer.attention.qkv(layer.attention_norm(h), rope))  # (H|G, 1, E)
            cache.add(k, v, p)
            keys, values, _, score = (t[:, :cache.n] for t in cache.slots)
            out, received = attend_one(q, keys, values)
            score += received
            h = layer.after_attention(h, layer.attention.out(out[None]))
            cache.evict(self.next_pos, self.recent)
        self.next_pos += 1
        return model.output(model.norm(h[0, 0]))


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, policy: str, budget: int, *,
             stop_ids=(), question_from: int | None = None, **options) -> list[int]:
    """Greedy decoding of one prompt with the h2o or snapkv cache of `budget` tokens per layer and head.

    With `question_from`, the cache is cut to the budget after prompt[:question_from] (the context) and the rest (the
    question) goes through it one token at a time, as decoding does: the policy chooses what to keep before it knows
    the question, as when one cached document is asked several questions (query-agnostic compression). Without it,
    snapkv's observation window holds the question itself."""
    decoder = ScoredDecoder(model, policy, budget, **options)
    context = prompt if question_from is None else prompt[:question_from]
    logits, out = decoder.prefill(context), []
    for token in prompt[len(context):]:
        logits = decoder.step(token)
    for _ in range(max_new_tokens):
        out.append(int(logits.argmax()))
        if out[-1] in stop_ids or len(out) == max_new_tokens:
            break
        logits = decoder.step(out[-1])
    return out
