"""Tokenisation with tiktoken, built from a checkpoint's own byte-level BPE data: GGUF metadata, an HF tokenizer.json,
a Llama-3 tiktoken `tokenizer.model`, or the two files `Tokenizer.save` writes.

tiktoken merges the adjacent pair whose concatenation has the lowest rank and returns that rank as the id, so a
vocabulary fits it when its ids follow its merge order (GPT-2, SmolLM2 and Llama-3 do). Where tiktoken and HF
`tokenizers` differ, we follow HF: special-token strings in the text are matched; a byte with no token of its own
(SmolLM2 has 21) is dropped, where tiktoken would panic; a pre-tokenizer that isolates each digit (SmolLM2,
StarCoder) is folded into the split pattern.
"""
from __future__ import annotations

import base64
import codecs
import json
from collections.abc import Iterable
from datetime import datetime
from functools import cached_property
from pathlib import Path

import gguf
import jinja2.ext
import regex
import tiktoken
from jinja2.sandbox import ImmutableSandboxedEnvironment

from errors import UserError

# Split patterns. GPT2_DIGITS is HF's Digits(individual_digits=True) followed by GPT-2's ByteLevel regex, in one
# pattern: each digit is a piece of its own, and whitespace just before a digit stays in one piece.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
GPT2_DIGITS = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
GGUF_PRE = {"default": GPT2, "gpt-2": GPT2, "smollm": GPT2_DIGITS, "starcoder": GPT2_DIGITS, "refact": GPT2_DIGITS,
            "llama-bpe": LLAMA3, "smaug-bpe": LLAMA3, "qwen2": QWEN2}  # tokenizer.ggml.pre -> pattern, as llama.cpp
END_MARKERS = ("<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>")  # stop, where present
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   *(f"<|reserved_special_token_{i}|>" for i in range(2, 247))]  # Llama 3.1's 256, after the ranks
RANKS_FILE, META_FILE = "tokenizer.tiktoken", "tokenizer.longgen.json"  # what Tokenizer.save writes


class Tokenizer:
    """Text <-> token ids for one checkpoint. `ranks`: tiktoken's mergeable ranks (token bytes -> id, in merge
    order); `special`: tokens matched whole in the text (text -> id); `pattern`: the regex that splits text into
    pieces before BPE. Build one with `load`, `from_gguf` or `from_hf`."""

    def __init__(self, ranks: dict[bytes, int], special: dict[str, int], pattern: str, *, bos_id: int | None = None,
                 eos_id: int | None = None, stop_ids: Iterable[int] = (), add_bos: bool = False,
                 chat_template: str | None = None):
        self._ranks, self._special, self._pattern = ranks, special, pattern
        self._enc = tiktoken.Encoding("longgen", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        self._split = regex.compile(pattern)
        longest_first = sorted(map(regex.escape, special), key=len, reverse=True)
        self._special_split = regex.compile(f"({'|'.join(longest_first) or '(?!)'})")
        self._missing = bytes(b for b in range(256) if bytes([b]) not in ranks)  # bytes with no token
        self.bos_id: int | None = bos_id
        self.eos_id: int | None = eos_id
        ends = [special[name] for name in END_MARKERS if name in special]
        self.stop_ids: frozenset[int] = frozenset([*stop_ids, *ends, *([] if eos_id is None else [eos_id])])
        self.add_bos: bool = add_bos  # encode()'s default
        self.chat_template: str | None = chat_template
        self.n_vocab: int = self._enc.n_vocab

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text` (special-token strings in it become their ids), after BOS if `add_bos` (default:
        the checkpoint's own setting) and the checkpoint has one."""
        add_bos = self.add_bos if add_bos is None else add_bos
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        data = text.encode("utf-8", "surrogatepass")
        if len(data.translate(None, self._missing)) == len(data):  # every byte has a token: all tiktoken
            return ids + self._enc.encode(text, allowed_special="all")
        # As HF does: special tokens, then pieces of the split pattern; in each piece drop the bytes with no token
        # and BPE the rest as one piece, so merges reach across a dropped byte (",\x04," is the one token ",,").
        for i, part in enumerate(self._special_split.split(text)):
            ids += [self._special[part]] if i % 2 else self._encode_dropping_missing(part)
        return ids

    def _encode_dropping_missing(self, text: str) -> list[int]:
        """Plain text with bytes that have no token: split, drop those bytes from each piece, BPE what is left."""
        return [i for piece in self._split.findall(text) if (kept := piece.encode().translate(None, self._missing))
                for i in self._enc._encode_single_piece(kept)]  # BPE only, no second split

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` as plain text, without BOS: special-token strings in it are tokenised like any other
        text (a training corpus must not inject control tokens); bytes with no token are dropped, as in `encode`."""
        data = text.encode("utf-8", "surrogatepass")
        if len(data.translate(None, self._missing)) == len(data):  # every byte has a token: all tiktoken
            return self._enc.encode_ordinary(text)
        return self._encode_dropping_missing(text)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the tokens stand for, joined; a special token stands for its text."""
        return self._enc.decode_bytes([int(i) for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """The text the tokens stand for; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @cached_property
    def _template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise UserError("This checkpoint has no chat template; give a plain prompt instead of chat messages.")

        def raise_exception(message: str):
            raise UserError(f"The chat template refused these messages: {message}")

        # transformers' environment: sandboxed, trim_blocks/lstrip_blocks, loop controls, its helpers and tojson
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda f: datetime.now().strftime(f)}
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, [{"role": ..., "content": ...}, ...], rendered as transformers does;
        with `add_generation_prompt`, it ends where the assistant's reply begins."""
        bos, eos = (None if i is None else self.decode([i]) for i in (self.bos_id, self.eos_id))
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=bos, eos_token=eos)

    def save(self, directory: str | Path) -> None:
        """Write RANKS_FILE (tiktoken's format: a base64 token and its rank a line) and META_FILE (JSON: the split
        pattern, special tokens and settings) into `directory`; `load(directory)` reads them back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(self._ranks.items(), key=lambda x: x[1])]
        (directory / RANKS_FILE).write_text("".join(lines))
        meta = dict(pattern=self._pattern, special=self._special, bos_id=self.bos_id, eos_id=self.eos_id,
                    stop_ids=sorted(self.stop_ids), add_bos=self.add_bos, chat_template=self.chat_template)
        (directory / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False))


class StreamDecoder:
    """Text from ids generated one at a time, holding back a character until all of its UTF-8 bytes have come."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Take one id; return the text it completes (maybe "")."""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """Return what is held back, an incomplete character as U+FFFD."""
        return self._utf8.decode(b"", final=True)


def _merge_ranks(vocab: dict[str, int], merges: Iterable[tuple[str, str]], source: Path) -> dict[bytes, int]:
    """tiktoken ranks from a vocabulary spelled in GPT-2's byte alphabet and its merges: each single byte, then
    each merge's result, at its id. Tokens that no merge makes are left out, as HF's BPE never produces them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in
                                              enumerate(b for b in range(256) if b not in printable)}
    try:
        ranks = {bytes([byte[t]]): i for t, i in vocab.items() if t in byte}
        last = -1
        for a, b in merges:
            if (token := bytes(byte[c] for c in a + b)) not in ranks:  # a later merge making it again adds nothing
                if vocab[a + b] < last:
                    raise ValueError(f"the ids do not follow the merge order at {a!r} {b!r}")
                ranks[token] = last = vocab[a + b]
    except (KeyError, ValueError) as e:
        raise UserError(f"{source} is not a byte-level BPE vocabulary that tiktoken can use ({e}); use a GPT-2, "
                        "SmolLM2 or Llama-3 style checkpoint.") from None
    return ranks


def from_gguf(path_or_reader: str | Path | gguf.GGUFReader) -> Tokenizer:
    """The tokenizer in a GGUF file's `tokenizer.*` metadata (byte-level BPE: `tokenizer.ggml.model` "gpt2")."""
    if isinstance(path_or_reader, gguf.GGUFReader):
        reader, source = path_or_reader, Path(path_or_reader.data.filename)
    else:
        try:
            reader = gguf.GGUFReader(source := _existing(path_or_reader))
        except (OSError, ValueError) as e:
            raise UserError(f"Could not read {source} as GGUF ({e}); re-download or re-convert it.") from None
    get = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default  # noqa: E731
    if (model := get("tokenizer.ggml.model")) != "gpt2":
        raise UserError(f"{source} has tokenizer.ggml.model {model!r}, not 'gpt2' (byte-level BPE), the only kind "
                        "longgen reads; use a GPT-2, SmolLM2 or Llama-3 style checkpoint.")
    if (pattern := GGUF_PRE.get(pre := get("tokenizer.ggml.pre", "default"))) is None:
        raise UserError(f"{source} has pre-tokenizer {pre!r}, which longgen lacks; use a checkpoint with one of "
                        f"{', '.join(GGUF_PRE)}.")
    tokens = get("tokenizer.ggml.tokens")
    kinds = get("tokenizer.ggml.token_type", [1] * len(tokens))
    special = {t: i for i, (t, kind) in enumerate(zip(tokens, kinds)) if kind in (3, 4)}  # control, user-defined
    vocab = {t: i for i, t in enumerate(tokens) if t not in special}
    ranks = _merge_ranks(vocab, (m.split(" ", 1) for m in get("tokenizer.ggml.merges", [])), source)
    return Tokenizer(ranks, special, pattern, bos_id=get("tokenizer.ggml.bos_token_id"),
                     eos_id=get("tokenizer.ggml.eos_token_id"), add_bos=bool(get("tokenizer.ggml.add_bos_token")),
                     chat_template=get("tokenizer.chat_template"))


def _hf_pattern(pre: dict | None) -> str | None:
    """The split pattern equal to a tokenizer.json pre_tokenizer of a kind we know, else None."""
    steps = (pre.get("pretokenizers") or [pre]) if pre else []
    kinds = [step.get("type") for step in steps]
    if not kinds or kinds[-1] != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    first, byte_regex = steps[0], steps[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and byte_regex:
        return GPT2
    if kinds == ["Digits", "ByteLevel"] and first.get("individual_digits") and byte_regex:
        return GPT2_DIGITS
    if kinds == ["Split", "ByteLevel"] and not byte_regex and first.get("behavior") == "Isolated" \
            and not first.get("invert") and "Regex" in first.get("pattern", {}):
        return first["pattern"]["Regex"]
    return None


def from_hf(directory: str | Path) -> Tokenizer:
    """The tokenizer in an HF directory: tokenizer.json (byte-level BPE), with tokenizer_config.json (BOS, EOS,
    chat template), chat_template.jinja and generation_config.json (more stop ids) where present."""
    directory = _existing(directory)
    read = lambda name: _read_json(directory / name) if (directory / name).is_file() else {}  # noqa: E731
    spec, config, generation = read("tokenizer.json"), read("tokenizer_config.json"), read("generation_config.json")
    model, pattern = spec.get("model", {}), _hf_pattern(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer") or pattern is None:
        raise UserError(f"{directory / 'tokenizer.json'} is not a byte-level BPE tokenizer (GPT-2, SmolLM2 or "
                        "Llama-3 style), the only kind longgen reads; use such a checkpoint.")
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}  # all matched whole in the text
    vocab = {t: i for t, i in model["vocab"].items() if t not in special}
    merges = (m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", []))
    ranks = _merge_ranks(vocab, merges, directory / "tokenizer.json")
    bos, eos = (t["content"] if isinstance(t, dict) else t for t in (config.get("bos_token"), config.get("eos_token")))
    # transformers adds BOS when the post-processor's template starts with it (not from tokenizer_config.json)
    post = spec.get("post_processor") or {}
    single = [p["single"] for p in post.get("processors", [post]) if p.get("type") == "TemplateProcessing"]
    add_bos = any(s and s[0].get("SpecialToken", {}).get("id") == bos for s in single)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates
        template = {t["name"]: t["template"] for t in template}.get("default")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    stop = generation.get("eos_token_id", [])
    bos_id, eos_id = (special.get(t, model["vocab"].get(t)) for t in (bos, eos))
    return Tokenizer(ranks, special, pattern, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, chat_template=template,
                     stop_ids=stop if isinstance(stop, list) else [stop])


def load(path: str | Path) -> Tokenizer:
    """The tokenizer at `path`: a .gguf file, or a directory with Tokenizer.save's files, an HF tokenizer.json, or
    a Llama-3 tiktoken `tokenizer.model` (which holds no special tokens: Llama 3.1's follow its ranks)."""
    path = _existing(path)
    if path.is_file() and path.suffix == ".gguf":
        return from_gguf(path)
    if (path / META_FILE).is_file():
        try:
            return Tokenizer(_read_ranks(path / RANKS_FILE), **_read_json(path / META_FILE))
        except TypeError as e:  # META_FILE lacks a setting or has one we do not know
            raise UserError(f"{path / META_FILE} is damaged ({e}); save the tokenizer again.") from None
    if (path / "tokenizer.json").is_file():
        return from_hf(path)
    if (path / "tokenizer.model").is_file():
        ranks = _read_ranks(path / "tokenizer.model")
        special = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
        return Tokenizer(ranks, special, LLAMA3, bos_id=special["<|begin_of_text|>"],
                         eos_id=special["<|end_of_text|>"], add_bos=True)
    raise UserError(f"{path} holds no tokenizer; pass a .gguf file or a directory with tokenizer.json, a Llama-3 "
                    "tokenizer.model, or the files Tokenizer.save writes.")


def _read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: a base64 token and its rank on each line."""
    try:
        return {base64.b64decode(token, validate=True): int(rank)
                for token, rank in (line.split() for line in path.read_bytes().splitlines() if line)}
    except (OSError, ValueError):  # ValueError: not two fields, bad base64 (binascii.Error), a rank not a number
        raise UserError(f"Could not read {path} as a tiktoken BPE file; use a checkpoint with a byte-level BPE "
                        "tokenizer (a SentencePiece tokenizer.model, as Llama 2 has, is not supported).") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"Could not read {path} as JSON ({e}); re-download or re-create it.") from None


def _existing(path: str | Path) -> Path:
    if not (path := Path(path)).exists():
        raise UserError(f"{path} does not exist; pass a .gguf file or a directory holding a tokenizer.")
    return path
