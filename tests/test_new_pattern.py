"""Adding an attention pattern is one class: a toy one defined here ("the last `last` tokens only"), registered, runs
through the masks, the KV cache, the configs and a training step with nothing else changed."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from test_cache import cached_run, recomputed
from torch.nn.attention.flex_attention import create_block_mask

import longgen
import masks
import train as train_py
from loading import weights
from training.config import load_config
from errors import UserError
from model import build, init_weights, preset


@dataclass(frozen=True)
class LastTokens(masks.Pattern):
    """Query q sees key k iff k <= q and q - k < last: a window without sinks."""

    kind: ClassVar[str] = "last_tokens"
    last: int = 16

    def mask_mod(self, device=None):
        last_t = torch.tensor(self.last, device=device, dtype=torch.int32)
        return lambda b, h, q, k: (k <= q) & (q - k < last_t)

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        return ((k_lo <= q_hi) & ((q_lo - k_hi).clamp(min=0) < self.last),
                (k_hi <= q_lo) & (q_hi - k_lo < self.last))

    def keys_per_query(self, q):
        return torch.clamp(q + 1, max=self.last)

    def reach(self):
        return self.last

    def capacity(self, max_len):
        return min(max_len, self.last)

    def slot_of(self, pos):
        return pos % self.last

    def lookback(self):
        return self.last - 1

    def far_rows(self, before):
        return torch.zeros_like(before[..., 0])


@pytest.fixture
def registered():
    masks.register(LastTokens)
    yield
    del masks.PATTERNS[LastTokens.kind]  # other tests see the built-in patterns only


@pytest.mark.parametrize("last, n, q_offset, block", [(5, 37, 0, 8), (16, 100, 0, 16), (16, 60, 23, 8), (1, 9, 4, 4)])
def test_masks(registered, last, n, q_offset, block):
    pattern = masks.make_pattern("last_tokens", last=last, window=7)  # another pattern's parameter is ignored
    assert pattern == LastTokens(last)
    dense = masks.dense_mask(pattern, n, n + q_offset, q_offset=q_offset)[0, 0]
    q, k = torch.arange(q_offset, q_offset + n)[:, None], torch.arange(n + q_offset)[None, :]
    assert torch.equal(dense, (k <= q) & (q - k < last))
    ours = masks.block_mask(pattern, n, n + q_offset, q_offset=q_offset, block_size=block)
    mod = masks.shifted(pattern.mask_mod(), q_offset) if q_offset else pattern.mask_mod()
    ref = create_block_mask(mod, 1, 1, n, n + q_offset, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert pattern.pairs(n) == int(masks.dense_mask(pattern, n, n).sum())


def tiny(**overrides):
    torch.manual_seed(0)
    model = build(preset("tiny", **overrides))
    init_weights(model, std=0.08)
    return model.eval()


@pytest.mark.parametrize("length, chunk", [(5, 4096), (40, 7), (100, 16)])
def test_cache_equals_full_recompute(registered, length, chunk):
    model = tiny(layer_kinds=("last_tokens", "full", "last_tokens") * 2, pattern_params=dict(last=12))
    assert model.cfg.pattern_params["last"] == 12 and model.cfg.pattern("last_tokens") == LastTokens(12)
    torch.manual_seed(length)
    prompt = torch.randint(0, 512, (length,)).tolist()
    logits, tokens = cached_run(model, [prompt], 30, chunk)  # the 12-slot ring wraps
    reference = recomputed(model, prompt, tokens[0])
    torch.testing.assert_close(logits[0], reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens[0], reference.argmax(-1))


def test_configs_and_a_training_step(registered, tmp_path):
    # train.py's config takes the new parameter as pattern.last, longgen.convert applies it
    cfg = load_config(train_py.TrainConfig, None, ["preset=tiny", "sparse=last_tokens", "pattern.last=10",
                                                   "seq_len=64"])
    tok = type("Tok", (), {"n_vocab": 512})
    model_cfg = train_py.model_config(cfg, train_py.base_model(cfg, tok)[0])
    assert model_cfg.pattern_params["last"] == 10 and "last_tokens" in model_cfg.layer_kinds and "full" in model_cfg.layer_kinds
    with pytest.raises(UserError, match="pattern.last=0"):
        load_config(train_py.TrainConfig, None, ["preset=tiny", "pattern.last=0"])
    # the checkpoint's config keeps it
    assert weights.config_from_dict(weights.config_to_dict(model_cfg)) == model_cfg
    # one training step: the pattern's mask is in effect (another loss than full attention's), and it learns
    model = tiny(layer_kinds=model_cfg.layer_kinds, pattern_params=dict(last=10)).train()
    torch.manual_seed(1)
    tokens = torch.randint(0, 512, (2, 65))
    doc_ids = torch.zeros_like(tokens)
    doc_ids[1, 40:] = 1
    loss = train_py.lm_loss(model, tokens, doc_ids, doc_masking=True)
    full = longgen.full_attention(tiny(layer_kinds=model_cfg.layer_kinds, pattern_params=dict(last=10)))
    with torch.no_grad():
        assert abs(loss.item() - train_py.lm_loss(full, tokens, doc_ids, doc_masking=True).item()) > 1e-4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        assert train_py.lm_loss(model, tokens, doc_ids, doc_masking=True).item() < loss.item()
