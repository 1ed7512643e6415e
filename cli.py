"""What generate.py and eval.py share on the command line: the model options (checkpoint, device, dtype, CPU threads)
and the attention layout (LongGen's pattern: window, sinks, stride, local blocks, placement, full fraction), defined,
checked and applied in one place.

Importing this module does not import torch: the scripts parse and check their arguments first, so `--help` and a
mistyped option answer at once instead of after the 5-15 s that importing torch and its compiler take.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import re
import sys
from pathlib import Path

from errors import UserError

HERE = Path(__file__).resolve().parent
DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("checkpoint", "full", "longgen")
# generate.py decodes with one CPU thread unless told otherwise: torch's default, one thread per core, made decoding on
# two busy cores 2-3x slower (README, "On a CPU"). eval.py, mostly long prompts, keeps torch's default.
DECODING_THREADS = 1
# Each pattern option: (attribute of args, Config field, the sparse kind it shapes, its minimum)
PATTERN_OPTIONS = {"--window": ("window", "window", "sink_window", 1), "--sinks": ("sinks", "n_sink", "sink_window", 0),
                   "--stride": ("stride", "stride", "strided", 1),
                   "--local-blocks": ("local_blocks", "local_blocks", "strided", 1)}


def names(module: str, attr: str) -> tuple[str, ...]:
    """`module.attr`, a tuple of names, read from the module's source when it assigns a literal, so that listing the
    choices in --help does not import the module (and torch with it); otherwise imported. `module` may be dotted
    (evaluation.kv_policies)."""
    try:
        tree = ast.parse((HERE / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == attr for t in node.targets):
                return tuple(ast.literal_eval(node.value))
    except (OSError, SyntaxError, ValueError):
        pass
    return tuple(getattr(importlib.import_module(module), attr))


def sparse_kinds() -> tuple[str, ...]:
    """longgen.sparse_kinds() without importing it (and torch): the `kind` of every class masks.py registers, but
    full."""
    kinds = []
    for node in ast.parse((HERE / "masks.py").read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "register" for d in node.decorator_list):
            kinds += [item.value.value for item in node.body if isinstance(item, ast.AnnAssign)
                      and getattr(item.target, "id", None) == "kind" and isinstance(item.value, ast.Constant)]
    return tuple(k for k in kinds if k != "full")


# ------------------------------------------------------------------------------------------------ options
def add_model_args(p: argparse.ArgumentParser, threads: int | None = None) -> None:
    """--checkpoint, --device, --dtype, --threads (default `threads`; None: torch's, one per core), and the layout
    options (add_layout_args)."""
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", type=Path, help=".gguf file, Hugging Face Llama directory or longgen checkpoint "
                                                   "directory (default: SmolLM2-135M-Instruct, fetched once)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if a GPU is available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    g.add_argument("--threads", type=int, default=threads,
                   help=f"CPU threads for torch (default {threads}: fastest decoding on busy cores; more help long "
                        "prompts on idle ones)" if threads else "CPU threads for torch (default: one per core)")
    add_layout_args(p)


def add_layout_args(p: argparse.ArgumentParser) -> None:
    """--layout and LongGen's pattern options. Every pattern option defaults to None, so that one given where it has no
    effect is refused (check_layout_args) instead of ignored."""
    g = p.add_argument_group("attention layout (the pattern options need --layout longgen)")
    g.add_argument("--layout", choices=LAYOUTS, default="checkpoint",
                   help="as the checkpoint records it (default), every layer full, or converted to LongGen's hybrid; "
                        "converting a model not trained for it saves memory (and on a GPU time) but breaks "
                        "long-range retrieval (README)")
    g.add_argument("--sparse", choices=sparse_kinds(), help="the sparse layers' pattern (default sink_window)")
    g.add_argument("--placement", choices=names("longgen", "PLACEMENTS"),
                   help="where the full-attention layers go (default middle, the paper's; calibrated: the layers "
                        "--full-layers names)")
    g.add_argument("--full-layers", type=layer_list, metavar="I,J,...",
                   help="with --placement calibrated: the layers that keep full attention, as calibrate.py printed "
                        "them (for SmolLM2-135M: 5,6,7,14,17,18,20,21,23,24)")
    g.add_argument("--full-fraction", type=float, help="share of the layers that keep full attention (default 1/3)")
    g.add_argument("--window", type=int, help="sink_window: recent tokens each query sees (default: the "
                                              "checkpoint's, 2048 for a converted model)")
    g.add_argument("--sinks", type=int, help="sink_window: first tokens every query sees (default: the "
                                             "checkpoint's, 64)")
    g.add_argument("--stride", type=int, help="strided: every stride-th block stays visible (default: the "
                                              "checkpoint's, 64)")
    g.add_argument("--local-blocks", type=int, help="strided: recent blocks each query sees, its own included "
                                                    "(default: the checkpoint's, 16)")
    g.add_argument("--pattern", type=pattern_setting, action="append", metavar="NAME=VALUE",
                   help="any parameter a pattern in masks.py declares, e.g. --pattern block=128 (repeatable): also "
                        "those of a pattern added there")


def pattern_setting(text: str) -> tuple[str, int]:
    """--pattern window=4096 -> ("window", 4096); the name is checked against the patterns when the model is built."""
    name, _, value = text.partition("=")
    try:
        return name.strip(), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE with a whole number, e.g. window=4096") from None


def layer_list(text: str) -> list[int]:
    """--full-layers 5,6,7 (or [5, 6, 7], as calibration.json and the configs write it)."""
    try:
        return [int(part) for part in text.strip("[] ").replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of layer numbers such as 5,6,7") from None


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**64:
        raise UserError(f"--seed must be between 0 and 2**64 - 1 (got {seed}).")


def check_model_args(args) -> None:
    """Checks that need no torch: the device's spelling, threads, and the layout options."""
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise UserError(f"--device {args.device} is not a device this runs on; use cpu, cuda or cuda:N.")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1 (got {args.threads}).")
    check_layout_args(args)


def check_layout_args(args) -> None:
    """Refuse a layout option that would have no effect, and values out of range, each in one sentence."""
    options = {"--sparse": "sparse", "--placement": "placement", "--full-fraction": "full_fraction",
               "--full-layers": "full_layers", "--pattern": "pattern",
               **{flag: attr for flag, (attr, *_) in PATTERN_OPTIONS.items()}}
    given = [flag for flag, attr in options.items() if getattr(args, attr) is not None]
    if given and args.layout != "longgen":
        raise UserError(f"{given[0]} applies only with --layout longgen; add --layout longgen or drop {given[0]}.")
    sparse = args.sparse or "sink_window"
    for flag, (attr, _, kind, least) in PATTERN_OPTIONS.items():
        value = getattr(args, attr)
        if value is not None and kind != sparse:
            raise UserError(f"{flag} shapes the {kind} pattern, not {sparse}; add --sparse {kind} or drop {flag}.")
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least} (got {value}).")
    named = [name for name, _ in args.pattern or []] + [field for attr, field, _, _ in PATTERN_OPTIONS.values()
                                                        if getattr(args, attr) is not None]
    if len(set(named)) < len(named):
        twice = next(name for name in named if named.count(name) > 1)
        raise UserError(f"The pattern parameter {twice} is given twice (by --pattern or its own option); give it once.")
    if (args.placement == "calibrated") != (args.full_layers is not None):
        raise UserError("--placement calibrated and --full-layers go together: the layers to keep full come from "
                        "calibrate.py (for SmolLM2-135M: --full-layers 5,6,7,14,17,18,20,21,23,24).")
    if args.full_layers is not None and args.full_fraction is not None:
        raise UserError("--full-layers names the full layers, so --full-fraction has no effect; drop it.")
    if args.full_fraction is not None and not 0 < args.full_fraction <= 1:
        raise UserError(f"--full-fraction must be in (0, 1] (got {args.full_fraction}).")


# ------------------------------------------------------------------------------------------------ loading
def load_model(args):
    """(model, tokenizer) as the options ask: threads, device and dtype set, the checkpoint loaded, the layout applied.
    `args.device` is replaced by the device chosen."""
    import torch

    import longgen

    set_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device} was asked for but no CUDA GPU is available; use --device cpu.")
        index = int(args.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    model, tok = longgen.load(args.checkpoint, device=args.device, dtype=dtype)
    apply_layout(model, args)
    return model, tok


def set_threads(threads: int | None) -> None:
    """torch's CPU threads, if given (None keeps torch's default, one per core)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)


def apply_layout(model, args) -> None:
    """Set the model's attention layout as --layout and the pattern options say; warn (once, on stderr) when that
    converts the model to a layout it was not trained with."""
    import longgen

    if args.layout == "full":
        longgen.full_attention(model)
    elif args.layout == "longgen":
        before = model.cfg
        pattern = {field: getattr(args, attr) for attr, field, _, _ in PATTERN_OPTIONS.values()
                   if getattr(args, attr) is not None} | dict(args.pattern or [])
        longgen.convert(model, sparse=args.sparse or "sink_window", placement=args.placement or "middle",
                        full_fraction=1 / 3 if args.full_fraction is None else args.full_fraction,
                        full_layers=args.full_layers, **pattern)
        if not same_layout(before, model.cfg):
            print(untrained_warning(before), file=sys.stderr)


def same_layout(a, b) -> bool:
    """Whether two configs give every layer the same attention (kind, and the settings its pattern reads)."""
    return a.layer_kinds == b.layer_kinds and all(a.pattern(kind) == b.pattern(kind) for kind in set(b.layer_kinds))


def untrained_warning(before) -> str:
    trained = "every layer full" if set(before.layer_kinds) == {"full"} else "another layout"
    return (f"warning: --layout longgen converts a model trained with {trained} without training it: the KV cache "
            "shrinks (and on a GPU long prompts run faster), but the sparse layers lose every token outside their "
            "pattern, so long-range retrieval breaks (a passkey beyond the window is not found); a model trained "
            "with the layout (train.py) is what LongGen gives.")
