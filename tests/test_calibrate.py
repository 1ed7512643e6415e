"""calibrate.py: the repeated-span probe finds the layer that carries a copy from beyond the window."""
import json
import math

import numpy as np
import pytest
import torch

import calibrate
import longgen
from errors import UserError
from model import build, preset

PLANTED = 3  # the layer built to copy from far back
VOCAB = 16  # the probe's text uses tokens 0..15, one-hot in the residual stream
SPAN, CUE = 8, 2


def copying_model(planted: int = PLANTED):
    """The tiny preset with random weights, except that layer `planted` copies the token 36 positions back: its head 0
    attends by position alone (RoPE, constant queries and keys) to the offset that separates the probe's two copies,
    reads the token's one-hot code and writes it where the output layer reads. Every other layer is random and small.
    Sink + window layers (4 + 24 tokens) cannot reach that far, so converting this layer alone loses the copy."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = build(cfg)
    H, G, E, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
    kappa = math.sqrt(D / 2)  # RMSNorm of e0 + e_(1+v): every channel scaled by this
    reach = cfg.pattern_params["n_sink"] + cfg.pattern_params["window"]
    offset = 2 * reach + 2 * SPAN + 1 - SPAN - reach - 1  # gap - 1 = 36
    with torch.no_grad():
        emb = torch.zeros(cfg.vocab_size, D)
        emb[:, 0] = 1.0  # a constant channel: the positional head's queries and keys come from it
        emb[torch.arange(VOCAB), 1 + torch.arange(VOCAB)] = 1.0  # tokens 0..15 one-hot in channels 1..16
        model.tok_embeddings.weight.copy_(emb)
        layer = model.layers[planted]
        w = torch.zeros_like(layer.attention.wqkv.weight)  # rows: q (H * E), k (G * E), v (G * E)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, E, 2).float() / E)
        amp = math.sqrt(4 * 40.0)  # 40 nats per frequency at the peak, after SDPA's 1 / sqrt(E)
        for i, f in enumerate(inv_freq[:4].tolist()):  # the four fastest rotations make the peak sharp
            w[i, 0] = amp / kappa  # head 0's query: (1, 0) in each rotating pair
            w[H * E + i, 0] = amp * math.cos(f * offset) / kappa  # kv head 0's key, rotated back by the offset
            w[H * E + i + E // 2, 0] = amp * math.sin(f * offset) / kappa
        w[H * E + G * E + torch.arange(VOCAB), 1 + torch.arange(VOCAB)] = 1.0 / kappa  # value: the one-hot code
        layer.attention.wqkv.weight.copy_(w)
        wo = torch.zeros_like(layer.attention.wo.weight)
        wo[1 + VOCAB + torch.arange(VOCAB), torch.arange(VOCAB)] = 8.0  # head 0's output to channels 17..32
        layer.attention.wo.weight.copy_(wo)
        layer.feed_forward.w2.weight.zero_()
        out = torch.zeros_like(model.output.weight)
        out[torch.arange(VOCAB), 1 + VOCAB + torch.arange(VOCAB)] = 4.0  # the logits read the copied code
        model.output.weight.copy_(out)
    return model.eval()


def docs(n: int = 4, length: int = 400, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, length) for _ in range(n)]


def probe(**kw) -> calibrate.Probe:
    cfg = preset("tiny")
    reach = cfg.pattern_params["n_sink"] + cfg.pattern_params["window"]
    return calibrate.Probe(**{**dict(samples=6, length=2 * reach + 2 * SPAN + 1, span=SPAN, cue=CUE,
                                     depth=(0.0, 0.0), batch_size=3), **kw})


@pytest.mark.parametrize("rule", calibrate.RULES)
def test_the_planted_copying_layer_is_kept_full(rule):
    model = copying_model()
    cal = calibrate.calibrate(model, docs(), n_full=1, rule=rule, probe=probe())
    assert cal.full_layers == [PLANTED]
    assert cal.layout == tuple("full" if i == PLANTED else "sink_window" for i in range(6))
    assert cal.nll_full < 0.5  # the full model copies the span
    assert max(range(6), key=lambda i: cal.single[i]) == PLANTED
    assert cal.single[PLANTED] > 2.0 and max(abs(x) for i, x in enumerate(cal.single) if i != PLANTED) < 0.5
    assert model.cfg.layer_kinds == ("full",) * 6  # the model is left as it was


def test_validation_measures_windows_the_choice_never_saw():
    cal = calibrate.calibrate(copying_model(planted=0), docs(), n_full=2, probe=probe(), validation_seed=7)
    v = cal.validation
    assert v["seed"] == 7 and v["nll_full"] < 0.5 and v["nll_layout"] < 0.5
    assert v["nll_middle"] > v["nll_layout"] + 2.0  # the middle third (layers 2, 3) misses the copying layer 0


def test_planted_elsewhere_moves_the_choice():
    cal = calibrate.calibrate(copying_model(planted=5), docs(), n_full=2, rule="greedy", probe=probe())
    assert 5 in cal.full_layers and len(cal.full_layers) == 2
    assert len(cal.greedy_order) == 4 and cal.nll_layout == cal.greedy_nll[-1]


def test_deterministic_and_written(tmp_path):
    model = copying_model()
    a = calibrate.calibrate(model, docs(), n_full=2, probe=probe(depth=(0.0, 1.0)))
    b = calibrate.calibrate(model, docs(), n_full=2, probe=probe(depth=(0.0, 1.0)))
    a.seconds = b.seconds = 0.0
    assert a == b
    path = calibrate.write(a, tmp_path)
    assert (tmp_path / "calibration.png").stat().st_size > 1000
    back = calibrate.read_calibration(path)
    back.seconds = 0.0
    assert back == a
    assert json.loads(path.read_text())["full_layers"] == a.full_layers


@pytest.mark.parametrize("kw, message", [
    (dict(n_full=7), "must be a whole number of layers from 1 to 6"),
    (dict(n_full=0), "must be a whole number of layers from 1 to 6"),
    (dict(n_full=1, rule="best"), "Unknown calibration rule"),
    (dict(n_full=1, sparse="dense"), "Unknown sparse kind"),
    (dict(n_full=1, probe=probe(length=47)), "too short for a pattern that reaches 28 tokens back; use at least 48"),
    (dict(n_full=1, probe=probe(length=2000)), "exceeds the model's context of 1024"),
])
def test_bad_values_are_one_sentence(kw, message):
    with pytest.raises(UserError, match=message):
        calibrate.calibrate(copying_model(), docs(), **kw)


def test_a_pattern_that_sees_everything_has_nothing_to_calibrate():
    model = copying_model()
    model.cfg = model.cfg.with_pattern(stride=1)  # strided with every block kept: causal attention
    with pytest.raises(UserError, match="sees every earlier token"):
        calibrate.calibrate(model, docs(), n_full=1, sparse="strided")


def test_a_short_context_puts_the_first_copy_just_past_the_sinks():
    """Llama-2 (4K) against sink 64 + window 2,048: no room for the first copy a window away from both ends."""
    windows, second = calibrate.probe_windows(docs(n=2), calibrate.Probe(samples=20, span=8, cue=2), 80, 28, n_sink=4)
    assert second == 72
    for w in windows.numpy():
        starts = [i for i in range(4, 80 - 8 - 28 - 8 + 1) if (w[i:i + 8] == w[72:]).all()]
        assert starts and 4 <= starts[0] <= 36  # after the sinks, and ending before the second copy's window
    with pytest.raises(UserError, match="use at least 48"):
        calibrate.probe_windows(docs(n=2), calibrate.Probe(span=8, cue=2), 47, 28, n_sink=4)


def test_too_little_text_is_one_sentence():
    with pytest.raises(UserError, match="needs at least"):
        calibrate.calibrate(copying_model(), docs(n=1, length=50), n_full=1, probe=probe())


def test_calibrated_layout_in_convert():
    cfg = longgen.convert(preset("tiny"), placement="calibrated", full_layers=[1, 4])
    assert cfg.layer_kinds == ("sink_window", "full", "sink_window", "sink_window", "full", "sink_window")
    assert longgen.n_full_layers(30) == 10 and longgen.n_full_layers(32) == 12
    with pytest.raises(UserError, match="needs the layers to keep full"):
        longgen.convert(preset("tiny"), placement="calibrated")
    with pytest.raises(UserError, match="set placement to calibrated"):
        longgen.convert(preset("tiny"), full_layers=[1])
    with pytest.raises(UserError, match="layer numbers from 0 to 5"):
        longgen.convert(preset("tiny"), placement="calibrated", full_layers=[6])
