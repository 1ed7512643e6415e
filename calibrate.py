"""Which layers keep full attention: score every layer of a pretrained model by how much long-range retrieval it loses
when made sparse, and keep the ones that matter.

    python calibrate.py --data data/corpus/python-docs data/corpus/linux-docs --n-full 10 --out runs/calibration
    python calibrate.py --checkpoint PATH --sparse strided --rule single --n-full 12 --out DIR

LongGen keeps the middle third of the layers full. At small scale that choice decides retrieval before any training:
in a model, the heads that copy from far back in the context sit in a few layers, not in the middle ones in particular.
This module measures it instead of assuming it.

The probe ("repeated spans", no evaluation task in it): a window of held-out corpus text in which a span of `span`
tokens, taken from elsewhere in the corpus, appears twice, the first copy further back than the sparse pattern's window
reaches, the second at the end. Given the first `cue` tokens of the second copy, a model that can reach back predicts
the rest of it; the score of a layout is the mean negative log-likelihood (nats per token) of those tokens. Two rules
pick the layers that stay full:

  * `single`: convert one layer at a time; a layer's score is how much the NLL rises; keep the n_full highest.
  * `greedy`: start with every layer full and convert, one at a time, the layer whose conversion raises the NLL of the
    layout built so far the least, until n_full are left. It sees interactions (two layers that back each other up)
    that single-layer scores miss, for about n_layers / 2 times the forward passes.

Both are deterministic for a seed. `calibrate` returns the chosen layout with every score; the command line writes it
as calibration.json (which `train.py placement=calibrated` and `longgen.convert(placement="calibrated")` read) and a
bar chart of the scores, calibration.png.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from errors import UserError, run_cli

RULES = ("greedy", "single")


@dataclass
class Probe:
    """The repeated-span probe: `samples` windows of `length` tokens (0: three times the pattern's reach plus two spans,
    rounded up to 128 k + 1, at most the model's context), each with a span of `span` tokens twice; the last
    span - cue tokens are scored."""
    samples: int = 16
    length: int = 0
    span: int = 32
    cue: int = 8
    seed: int = 0
    batch_size: int = 8  # windows per forward pass
    depth: tuple[float, float] = (0.0, 1.0)  # where the first copy may start, as a share of the positions allowed


@dataclass
class Calibration:
    layout: tuple[str, ...]  # one attention kind per layer, bottom to top
    rule: str
    sparse: str
    n_full: int
    full_layers: list[int]
    nll_full: float  # every layer full
    nll_layout: float  # the chosen layout
    single: list[float]  # per layer: NLL rise when that layer alone is converted
    greedy_order: list[int] = field(default_factory=list)  # layers in the order greedy converted them
    greedy_nll: list[float] = field(default_factory=list)  # NLL after each of those conversions
    probe: dict = field(default_factory=dict)
    pattern: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)  # NLLs on windows of another seed: full, chosen, the paper's middle
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


# ------------------------------------------------------------------------------------------------ the probe
def reach(cfg, sparse: str) -> float:
    """Tokens a sparse layer of this kind is sure to see behind a query (masks.Pattern.reach: sinks plus window, or
    the local blocks)."""
    return cfg.pattern(sparse).reach()


def probe_windows(docs: list[np.ndarray], probe: Probe, length: int, reach_tokens: int,
                  n_sink: int = 0) -> tuple[torch.Tensor, int]:
    """(samples, length) token windows with a repeated span, and the index where the second copy starts. The first
    copy ends more than `reach_tokens` before the second starts, so no sparse layer's window or local blocks reach it
    from a scored query. It starts at least `reach_tokens` into the window (as far from the start as from the end)
    when the length allows that, else just past the `n_sink` sink tokens (a model whose context is short for its
    pattern, e.g. Llama-2's 4K against sink 64 + window 2,048)."""
    n, last_start = probe.span, length - 2 * probe.span - reach_tokens
    if probe.span < 2 or not 0 < probe.cue < probe.span:
        raise UserError(f"The probe needs span >= 2 and 0 < cue < span (span={probe.span}, cue={probe.cue}).")
    if last_start < n_sink:
        raise UserError(f"A calibration length of {length} tokens is too short for a pattern that reaches "
                        f"{reach_tokens} tokens back; use at least {n_sink + reach_tokens + 2 * n} (--length).")
    lowest = reach_tokens if last_start > reach_tokens else n_sink
    stream = np.concatenate([d for d in docs if len(d)]) if docs else np.zeros(0, dtype=np.int64)
    if len(stream) < 2 * length:
        raise UserError(f"The calibration data holds {len(stream)} tokens; it needs at least {2 * length} "
                        f"(two windows of {length}): give more documents.")
    rng = np.random.default_rng(probe.seed)
    windows = np.empty((probe.samples, length), dtype=np.int64)
    for i in range(probe.samples):
        at = rng.integers(0, len(stream) - length + 1)
        window = stream[at:at + length].astype(np.int64)
        src = rng.integers(0, len(stream) - n + 1)
        while abs(src - at) < length:  # the span comes from text outside this window
            src = rng.integers(0, len(stream) - n + 1)
        span = stream[src:src + n]
        first = lowest + round(rng.uniform(*probe.depth) * (last_start - lowest))
        window[first:first + n] = span
        window[length - n:] = span
        windows[i] = window
    return torch.from_numpy(windows), length - n


@torch.no_grad()
def probe_nll(model, windows: torch.Tensor, second: int, cue: int, layout: tuple[str, ...], batch_size: int) -> float:
    """Mean NLL (nats per token) of the second copy's tokens after its cue, with the model's layers set to `layout`."""
    device = model.tok_embeddings.weight.device
    saved = model.cfg
    model.cfg = replace(saved, layer_kinds=tuple(layout))
    try:
        total, count = 0.0, 0
        for a in range(0, len(windows), batch_size):
            tokens = windows[a:a + batch_size].to(device)
            targets = torch.full_like(tokens[:, 1:], -100)
            targets[:, second + cue - 1:] = tokens[:, second + cue:]  # targets[t] is the token after position t
            total += float(model(tokens[:, :-1], targets=targets, loss_chunk=1024))
            count += int((targets != -100).sum())
        return total / count
    finally:
        model.cfg = saved


# ------------------------------------------------------------------------------------------------ the rules
def calibrate(model, docs: list[np.ndarray], n_full: int, *, sparse: str = "sink_window", rule: str = "greedy",
              probe: Probe | None = None, validation_seed: int | None = None,
              progress: bool = False) -> Calibration:
    """Score the layers of `model` (every layer full, pretrained) with the repeated-span probe on `docs` (token
    arrays of held-out text) and choose the `n_full` layers that stay full under `rule`. With `validation_seed`, the
    chosen layout, every layer full and the paper's middle third are also measured on windows drawn with that seed,
    which the choice never saw. The model's config is left as it was. Deterministic for probe.seed."""
    from longgen import longgen_layout, sparse_kinds

    cfg, probe = model.cfg, probe or Probe()
    L = cfg.n_layers
    if rule not in RULES:
        raise UserError(f"Unknown calibration rule {rule!r}; choose one of: {', '.join(RULES)}.")
    if sparse not in sparse_kinds():
        raise UserError(f"Unknown sparse kind {sparse!r}; choose one of: {', '.join(sparse_kinds())}.")
    if isinstance(n_full, bool) or not isinstance(n_full, int) or not 1 <= n_full <= L:
        raise UserError(f"n_full={n_full} must be a whole number of layers from 1 to {L}.")
    if probe.samples < 1 or probe.batch_size < 1:
        raise UserError("The probe needs at least one sample and a batch size of at least 1.")
    if (sees := reach(cfg, sparse)) == math.inf:
        raise UserError(f"This {sparse} pattern sees every earlier token (it is full attention): nothing to calibrate; "
                        "give it a smaller reach.")
    back, n_sink = int(sees), getattr(cfg.pattern(sparse), "n_sink", 0)  # its sink tokens, if any
    tiles = -(-(3 * back + 2 * probe.span - 1) // 128)  # the inputs (length - 1 tokens) in whole 128-token tiles
    length = probe.length or min(128 * tiles + 1, cfg.max_seq_len)
    if length > cfg.max_seq_len:
        raise UserError(f"A calibration length of {length} exceeds the model's context of {cfg.max_seq_len}; "
                        "lower --length.")
    windows, second = probe_windows(docs, probe, length, back, n_sink)
    t0 = time.perf_counter()
    nll = lambda layout: probe_nll(model, windows, second, probe.cue, layout, probe.batch_size)  # noqa: E731
    full = ("full",) * L
    with_sparse = lambda layers: tuple(sparse if i in layers else "full" for i in range(L))  # noqa: E731
    bar = _bar(L + (sum(range(n_full + 1, L + 1)) if rule == "greedy" else 0), progress)
    base = nll(full)
    single = []
    for i in range(L):
        single.append(nll(with_sparse({i})) - base)
        bar.update()
    order, path = [], []
    if rule == "single":
        keep = sorted(sorted(range(L), key=lambda i: (-single[i], i))[:n_full])
    else:
        converted: set[int] = set()
        while len(converted) < L - n_full:
            trial = {}
            for i in range(L):
                if i not in converted:
                    trial[i] = nll(with_sparse(converted | {i}))
                    bar.update()
            best = min(trial, key=lambda i: (trial[i], -i))  # ties: the higher layer goes sparse first
            converted.add(best)
            order.append(best)
            path.append(trial[best])
        keep = sorted(set(range(L)) - converted)
    bar.close()
    layout = tuple("full" if i in keep else sparse for i in range(L))
    validation = {}
    if validation_seed is not None:
        held, at = probe_windows(docs, replace(probe, seed=validation_seed), length, back, n_sink)
        middle = longgen_layout(L, sparse=sparse)
        measure = lambda lay: probe_nll(model, held, at, probe.cue, lay, probe.batch_size)  # noqa: E731
        validation = {"seed": validation_seed, "nll_full": measure(full), "nll_layout": measure(layout),
                      "nll_middle": measure(middle)}
    pattern = asdict(cfg.pattern(sparse))  # the sparse kind's own parameters
    return Calibration(layout=layout, rule=rule, sparse=sparse, n_full=n_full, full_layers=keep, nll_full=base,
                       nll_layout=path[-1] if path else nll(layout), single=single, greedy_order=order,
                       greedy_nll=path, probe={**asdict(probe), "length": length, "depth": list(probe.depth)},
                       pattern=pattern, validation=validation, seconds=time.perf_counter() - t0)


def read_calibration(path: str | Path) -> Calibration:
    """A calibration.json written by `calibrate.py` (or train.py's calibration step)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        data["layout"] = tuple(data["layout"])
        return Calibration(**data)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; run calibrate.py to make it, or give its path.") from None
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise UserError(f"{path} is not a calibration.json written by calibrate.py ({e}); make it again.") from None


def plot(cal: Calibration, path: str | Path, title: str = "") -> None:
    """Bar chart: each layer's NLL rise when it alone is made sparse; the layers kept full are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(cal.layout)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * L + 2), 3.2))
    colors = ["tab:red" if k == "full" else "tab:gray" for k in cal.layout]
    ax.bar(range(L), cal.single, color=colors)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(L), [str(i) for i in range(L)], fontsize=7)
    ax.set_xlabel("layer (red: kept full)")
    ax.set_ylabel("NLL rise, nats/token")
    ax.set_title(title or f"{cal.sparse}, rule {cal.rule}: {cal.n_full} of {L} layers full "
                          f"(probe NLL {cal.nll_full:.2f} all full, {cal.nll_layout:.2f} chosen)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(cal: Calibration, out_dir: str | Path) -> Path:
    """calibration.json and calibration.png in out_dir (the json written atomically); returns the json's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target, tmp = out / "calibration.json", out / "calibration.json.tmp"
    tmp.write_text(cal.to_json())
    tmp.replace(target)
    plot(cal, out / "calibration.png")
    return target


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="calibrating", unit="pass", disable=not enabled, file=sys.stderr)


# ------------------------------------------------------------------------------------------------ command line
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="the pretrained model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", nargs="+", required=True,
                   help="held-out documents (files or directories, as train.py's data.paths): the probe's text")
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="take only the documents train.py holds out at this data.eval_fraction (0: all of them)")
    p.add_argument("--n-full", type=int, required=True, help="layers that keep full attention")
    p.add_argument("--sparse", default="sink_window", help="the other layers' pattern: sink_window or strided")
    p.add_argument("--rule", choices=RULES, default="greedy", help="how the full layers are chosen (see above)")
    p.add_argument("--window", type=int, help="sink_window: window in tokens (default: the model's, 2,048)")
    p.add_argument("--n-sink", type=int, help="sink_window: sink tokens (default 64)")
    p.add_argument("--samples", type=int, default=16, help="probe windows")
    p.add_argument("--length", type=int, default=0, help="probe window in tokens (0: 3x the pattern's reach + 2 spans)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validation-seed", type=int, default=1,
                   help="also measure the chosen layout, every layer full and the middle third on windows of this "
                        "seed (-1: skip)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    p.add_argument("--out", default="runs/calibration", help="folder for calibration.json and calibration.png")
    args = p.parse_args(argv)

    import longgen
    from training.data import DataConfig, load_documents
    from model import compile_settings

    compile_settings()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tok = longgen.load(args.checkpoint, device=device, dtype=dtype)
    pattern = {k: v for k, v in (("window", args.window), ("n_sink", args.n_sink)) if v is not None}
    model.cfg = replace(longgen.full_attention(model.cfg), **pattern)
    split = "eval" if args.eval_fraction > 0 else "train"
    docs = load_documents(DataConfig(paths=args.data, eval_fraction=args.eval_fraction), tok, split)
    probe = Probe(samples=args.samples, length=args.length, seed=args.seed, batch_size=args.batch_size)
    cal = calibrate(model, [d for ds in docs.values() for d in ds], args.n_full, sparse=args.sparse, rule=args.rule,
                    probe=probe, validation_seed=None if args.validation_seed < 0 else args.validation_seed,
                    progress=True)
    path = write(cal, args.out)
    print(f"Full layers ({cal.rule}): {cal.full_layers}; probe NLL {cal.nll_full:.3f} with every layer full, "
          f"{cal.nll_layout:.3f} with this layout; {cal.seconds:.0f} s. Written: {path} and calibration.png.")
    if v := cal.validation:
        print(f"Validation windows (seed {v['seed']}): NLL {v['nll_full']:.3f} every layer full, "
              f"{v['nll_layout']:.3f} this layout, {v['nll_middle']:.3f} the middle third.")


if __name__ == "__main__":
    run_cli(main)
