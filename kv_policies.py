"""Post-hoc KV-cache reduction: the paper's baselines, applied at inference to a model trained with every layer full,
at the same KV budget as LongGen (tokens kept per layer and head).

- streaming (StreamingLLM, Xiao et al. 2024): the first 4 tokens and the most recent budget - 4. That is the
  sink_window pattern in every layer, so it runs on the compacted cache of cache.py.
- h2o (Zhang et al. 2023): the most recent half of the budget, plus the "heavy hitters": the tokens that have received
  the most attention so far (summed over queries, and over the query heads sharing a key/value head).
- snapkv (Li et al. 2024): the attention of the prompt's last `window` queries, pooled over neighbouring keys, picks
  which prompt tokens to keep; the window itself is kept.

h2o and snapkv choose per head from attention probabilities, so they run here, eagerly, one sequence at a time. The
prompt is processed with full attention, layer by layer; the cache is then cut to the budget. Each decoding step adds
one token per head and evicts the lowest-scoring one outside the recent window, so the cache never holds more than
`budget` tokens. Scores keep accumulating over decoding steps. With a budget covering the whole sequence, nothing is
evicted and the result is that of full attention.

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
    return replace(cfg, layer_kinds=("sink_window",) * cfg.n_layers, n_sink=N_SINK, window=budget - N_SINK)


class ScoredCache:
    """One layer's kept keys and values per key/value head, with their positions and scores."""

    def __init__(self, k_GnE, v_GnE, pos_Gn, score_Gn):
        self.k, self.v, self.pos, self.score = k_GnE, v_GnE, pos_Gn, score_Gn

    def keep(self, idx_Gn) -> None:
        """Keep these entries (per head), in position order."""
        idx_Gn = idx_Gn.sort(dim=-1).values
        take = lambda t: t.gather(1, idx_Gn[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        self.k, self.v = take(self.k), take(self.v)
        self.pos, self.score = self.pos.gather(1, idx_Gn), self.score.gather(1, idx_Gn)


def attention_with_scores(q_HSE, k_GSE, v_GSE, q_pos, k_pos, score_from: int = 0, chunk: int = 1024):
    """Causal attention, query chunk by query chunk, returning the output (H, S_q, E) and the attention each key
    received from queries at index >= score_from, summed over queries and over the heads of each group, (G, S_k)."""
    H, G = q_HSE.shape[0], k_GSE.shape[0]
    k, v = k_GSE.repeat_interleave(H // G, 0), v_GSE.repeat_interleave(H // G, 0)  # (H, S_k, E)
    outs, scores = [], torch.zeros(G, k_GSE.shape[1], dtype=torch.float32, device=k_GSE.device)
    for a in range(0, q_HSE.shape[1], chunk):
        q = q_HSE[:, a:a + chunk]  # (H, c, E)
        logits = (q.float() @ k.float().transpose(1, 2)) / q.shape[-1] ** 0.5  # (H, c, S_k)
        if k_pos is not None:  # causal (decoding steps need no mask: everything cached is in the past)
            logits = logits.masked_fill(k_pos[None, None, :] > q_pos[None, a:a + chunk, None], float("-inf"))
        probs = logits.softmax(dim=-1)
        outs.append((probs @ v.float()).to(q.dtype))
        counted = probs[:, max(score_from - a, 0):]  # queries whose attention is scored
        scores += counted.sum(dim=1).view(G, H // G, -1).sum(dim=1)
    return torch.cat(outs, dim=1), scores


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
        """The prompt, one layer at a time with full attention; each layer's cache is then cut to the budget: the
        recent tokens and the best-scored of the rest. Returns the logits after the prompt, (V,)."""
        model, device, S = self.model, self.inv_freq.device, len(prompt)
        pos = torch.arange(S, device=device)
        h = model.tok_embeddings(torch.tensor([prompt], device=device))  # (1, S, D)
        rope = rope_angles(self.inv_freq, pos, h.dtype)
        scored_from = 0 if self.policy == "h2o" else S - self.recent  # snapkv: the observation window only
        for layer in model.layers:
            q, k, v = (t[0] for t in layer.attention.qkv(layer.attention_norm(h), rope))  # (H|G, S, E)
            out, score = attention_with_scores(q, k, v, pos, pos, score_from=scored_from)
            h = layer.after_attention(h, layer.attention.out(out[None]))
            if self.policy == "snapkv":  # a key's neighbours vote with it
                score = F.avg_pool1d(score[:, None], self.pool, stride=1, padding=self.pool // 2,
                                     count_include_pad=False)[:, 0]
            cache = ScoredCache(k, v, pos.expand(self.G, S).clone(), score)
            if S > self.budget:
                best = score[:, :S - self.recent].topk(self.budget - self.recent, dim=-1).indices
                cache.keep(torch.cat([best, torch.arange(S - self.recent, S, device=device).expand(self.G, -1)], 1))
            self.caches.append(cache)
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
            cache.k, cache.v = torch.cat([cache.k, k], 1), torch.cat([cache.v, v], 1)
            cache.pos = torch.cat([cache.pos, p.expand(self.G, 1)], 1)
            cache.score = torch.cat([cache.score, torch.zeros(self.G, 1, device=device)], 1)
            out, score = attention_with_scores(q, cache.k, cache.v, p, None)
            cache.score += score
            h = layer.after_attention(h, layer.attention.out(out[None]))
            n = cache.k.shape[1]
            if n > self.budget:
                victim = cache.score[:, :n - self.recent].argmin(dim=-1, keepdim=True)  # (G, 1)
                everything = torch.arange(n, device=device).expand(self.G, n)
                cache.keep(everything[everything != victim].view(self.G, n - 1))
        self.next_pos += 1
        return model.output(model.norm(h[0, 0]))


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, policy: str, budget: int, *,
             stop_ids=(), **options) -> list[int]:
    """Greedy decoding of one prompt with the h2o or snapkv cache of `budget` tokens per layer and head."""
    decoder = ScoredDecoder(model, policy, budget, **options)
    logits, out = decoder.prefill(prompt), []
    for _ in range(max_new_tokens):
        out.append(int(logits.argmax()))
        if out[-1] in stop_ids or len(out) == max_new_tokens:
            break
        logits = decoder.step(out[-1])
    return out
