"""Tokenisation with tiktoken, built from a checkpoint's own byte-level BPE data: GGUF metadata, an HF tokenizer.json,
a Llama-3 tiktoken `tokenizer.model`, or the two files `Tokenizer.save` writes. Llama-2's SentencePiece BPE, whose
ids do not follow its merge order, has a class of its own in plain Python: `SentencePieceTokenizer`.

tiktoken merges the adjacent pair whose concatenation has the lowest rank and returns that rank as the id, so a
vocabulary fits it when its ids follow its merge order (GPT-2, SmolLM2 and Llama-3 do). Where tiktoken and HF
`tokenizers` differ, we follow HF: special-token strings in the text are matched; a byte with no token of its own
(SmolLM2 has 21) is dropped, where tiktoken would panic; a pre-tokenizer that isolates each digit (SmolLM2,
StarCoder) is folded into the split pattern.
"""
from __future__ import annotations

import base64
import codecs
import hashlib
import heapq
import json
from collections.abc import Iterable
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2.ext
import regex
import tiktoken
from jinja2.sandbox import ImmutableSandboxedEnvironment

from errors import UserError, read_json

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


class BaseTokenizer:
    """What both tokenizers here share: BOS, EOS and stop ids, encode's BOS default, decoding to text and the chat
    template. A subclass gives `encode_ordinary`, `decode_bytes`, `fingerprint` and `save`."""

    def __init__(self, *, n_vocab: int, bos_id: int | None, eos_id: int | None, stop_ids: Iterable[int],
                 add_bos: bool, chat_template: str | None):
        self.n_vocab: int = n_vocab
        self.bos_id: int | None = bos_id
        self.eos_id: int | None = eos_id
        self.stop_ids: frozenset[int] = frozenset([*stop_ids, *([] if eos_id is None else [eos_id])])
        self.add_bos: bool = add_bos  # encode()'s default
        self.chat_template: str | None = chat_template

    def _bos(self, add_bos: bool | None) -> list[int]:
        """[BOS] if `add_bos` (default: the checkpoint's own setting) and the checkpoint has one, else []."""
        add_bos = self.add_bos if add_bos is None else add_bos
        return [self.bos_id] if add_bos and self.bos_id is not None else []

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, after BOS if `add_bos` (default: the checkpoint's own setting)."""
        return self._bos(add_bos) + self.encode_ordinary(text)

    def encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        raise NotImplementedError

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


class Tokenizer(BaseTokenizer):
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
        ends = [special[name] for name in END_MARKERS if name in special]
        super().__init__(n_vocab=self._enc.n_vocab, bos_id=bos_id, eos_id=eos_id, stop_ids=[*stop_ids, *ends],
                         add_bos=add_bos, chat_template=chat_template)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text` (special-token strings in it become their ids), after BOS if `add_bos` (default:
        the checkpoint's own setting) and the checkpoint has one."""
        ids = self._bos(add_bos)
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

    def fingerprint(self) -> str:
        """A hash of what decides the token ids (the split pattern, the special tokens, the BPE ranks): tokenised
        corpora are cached under it."""
        ranks = sorted(self._ranks.items(), key=lambda item: item[1])
        return hashlib.sha256(repr((self._pattern, sorted(self._special.items()), ranks)).encode()).hexdigest()

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

    def __init__(self, tokenizer: BaseTokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Take one id; return the text it completes (maybe "")."""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """Return what is held back, an incomplete character as U+FFFD."""
        return self._utf8.decode(b"", final=True)


class SentencePieceTokenizer(BaseTokenizer):
    """Llama-2's tokenizer (SentencePiece BPE with byte fallback), as HF `tokenizers` runs it: spaces become "▁" and
    one "▁" goes before the text; then, over the whole text, the adjacent pair of symbols that comes first in
    `merges` is merged, again and again; a symbol left that is no token becomes the <0xXX> tokens of its UTF-8 bytes.
    `pieces`: the token of each id. Special tokens (`special`, e.g. <s>) are not matched in the text."""

    def __init__(self, pieces: list[str], merges: list[list[str]], special: dict[str, int], *, bos_id=None,
                 eos_id=None, stop_ids: Iterable[int] = (), add_bos: bool = True, chat_template: str | None = None,
                 unk_id: int | None = None):
        self._pieces, self._merges = list(pieces), [list(m) for m in merges]
        self._special, self._unk_id = special, unk_id
        self._vocab = {p: i for i, p in enumerate(self._pieces)}
        self._rank = {(a, b): r for r, (a, b) in reversed(list(enumerate(self._merges)))}  # the first listing wins
        self._bytes = [bytes([int(p[3:5], 16)]) if len(p) == 6 and p[:3] == "<0x" and p[5] == ">" else
                       (p if p in special else p.replace("▁", " ")).encode() for p in self._pieces]
        # Pieces never span "x▁" (x not ▁) in Llama-2: then each "▁..." word merges on its own, and is cached.
        self._by_word = not any(regex.search("[^▁]▁", p) for p in self._pieces)
        self._cache: dict[str, list[int]] = {}
        super().__init__(n_vocab=len(self._pieces), bos_id=bos_id, eos_id=eos_id, stop_ids=stop_ids, add_bos=add_bos,
                         chat_template=chat_template)

    def encode_ordinary(self, text: str) -> list[int]:
        if not text:
            return []
        text = "▁" + text.replace(" ", "▁")
        if not self._by_word:
            return self._bpe(text)
        ids = []
        for word in regex.findall("▁*[^▁]*", text):
            if word:
                if (cached := self._cache.get(word)) is None:
                    cached = self._bpe(word)
                    if len(self._cache) < 500_000:  # bounded: a corpus has many rare words
                        self._cache[word] = cached
                ids += cached
        return ids

    def _bpe(self, text: str) -> list[int]:
        """Merge the best-ranked adjacent pair (leftmost among equals) until no pair is a merge; symbols are a linked
        list, candidate pairs a heap whose stale entries are skipped."""
        sym = list(text)
        nxt, prv = list(range(1, len(sym) + 1)), list(range(-1, len(sym) - 1))
        heap = [(r, i, sym[i], sym[i + 1]) for i in range(len(sym) - 1)
                if (r := self._rank.get((sym[i], sym[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if sym[i] != a or j >= len(sym) or sym[j] != b:  # stale: a side was merged since
                continue
            sym[i], sym[j] = a + b, ""
            nxt[i] = nxt[j]
            if nxt[i] < len(sym):
                prv[nxt[i]] = i
            for left, right in ((prv[i], i), (i, nxt[i])):
                if left >= 0 and right < len(sym) and (r := self._rank.get((sym[left], sym[right]))) is not None:
                    heapq.heappush(heap, (r, left, sym[left], sym[right]))
        ids, i = [], 0
        while i < len(sym):
            if (t := self._vocab.get(sym[i])) is not None:
                ids.append(t)
            else:  # byte fallback
                ids += [self._vocab.get(f"<0x{c:02X}>", self._unk_id) for c in sym[i].encode()]
            i = nxt[i]
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the tokens stand for, "▁" as a space (the space before the first word included)."""
        return b"".join(self._bytes[int(i)] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The text, without the one space that encoding put before it."""
        text = super().decode(ids)
        return text[1:] if text.startswith(" ") else text

    def fingerprint(self) -> str:
        return hashlib.sha256(repr((self._pieces, self._merges)).encode()).hexdigest()

    def save(self, directory: str | Path) -> None:
        """META_FILE only (JSON): the pieces, merges, special tokens and settings."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = dict(sentencepiece=dict(pieces=self._pieces, merges=self._merges, unk_id=self._unk_id),
                    special=self._special, bos_id=self.bos_id, eos_id=self.eos_id, stop_ids=sorted(self.stop_ids),
                    add_bos=self.add_bos, chat_template=self.chat_template)
        (directory / META_FILE).write_text(json.dumps(meta, ensure_ascii=False))


def _merges_from_scores(pieces: list[str], scores: list[float], mergeable: list[bool]) -> list[list[str]]:
    """SentencePiece's rule as merges: the pair (a, b) joins when a + b is a piece, the higher its score the earlier
    (as transformers' converter lists them)."""
    vocab = {p for p, ok in zip(pieces, mergeable) if ok}
    found = [(-score, piece, k) for piece, score, ok in zip(pieces, scores, mergeable) if ok
             for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    return [[piece[:k], piece[k:]] for _, piece, k in sorted(found)]


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


def from_gguf(path_or_file) -> BaseTokenizer:
    """The tokenizer in a GGUF file's `tokenizer.*` metadata (byte-level BPE: `tokenizer.ggml.model` "gpt2"), from its
    path or its `loading.gguf_file.GGUFFile`. gguf is imported only here: the benchmarks import this module on machines
    without it."""
    from loading.gguf_file import GGUFFile, open_gguf

    gguf_file = path_or_file if isinstance(path_or_file, GGUFFile) else open_gguf(_existing(path_or_file))
    source, get = gguf_file.path, gguf_file.metadata.get
    if get("tokenizer.ggml.model") is None or get("tokenizer.ggml.tokens") is None:
        raise UserError(f"{source} holds no tokenizer (its tokenizer.ggml.model and tokenizer.ggml.tokens keys are "
                        "missing); convert the model again with llama.cpp's convert_hf_to_gguf.py, which writes them.")
    if (model := get("tokenizer.ggml.model")) == "llama":  # SentencePiece BPE (Llama 2)
        tokens, scores = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.scores")
        if scores is None:
            raise UserError(f"{source} holds a SentencePiece tokenizer without tokenizer.ggml.scores; convert the "
                            "checkpoint again with llama.cpp's convert_hf_to_gguf.py.")
        kinds = get("tokenizer.ggml.token_type", [1] * len(tokens))  # 1 normal, 2 unknown, 3 control, 6 byte
        return SentencePieceTokenizer(
            tokens, _merges_from_scores(tokens, scores, [k == 1 for k in kinds]),
            {t: i for i, (t, k) in enumerate(zip(tokens, kinds)) if k in (2, 3, 4)},
            bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(get("tokenizer.ggml.add_bos_token", True)), chat_template=get("tokenizer.chat_template"),
            unk_id=get("tokenizer.ggml.unknown_token_id"))
    if model != "gpt2":
        raise UserError(f"{source} has tokenizer.ggml.model {model!r}, not 'gpt2' (byte-level BPE) or 'llama' "
                        "(SentencePiece BPE), the kinds longgen reads; use a GPT-2, SmolLM2, Llama-2 or Llama-3 "
                        "style checkpoint.")
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


def _is_llama2(spec: dict) -> bool:
    """tokenizer.json spells Llama-2's SentencePiece steps: "▁" for spaces and before the text, no splitting."""
    norm, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm] if norm else [])
    if [(n.get("type"), n.get("prepend") or n.get("content"), n.get("pattern")) for n in steps] == \
            [("Prepend", "▁", None), ("Replace", "▁", {"String": " "})] and not pre:
        return True
    return not norm and pre.get("type") == "Metaspace" and pre.get("replacement") == "▁" and not pre.get("split") \
        and (pre.get("prepend_scheme") in ("first", "always") or pre.get("add_prefix_space"))


def from_hf(directory: str | Path) -> BaseTokenizer:
    """The tokenizer in an HF directory: tokenizer.json (byte-level BPE), with tokenizer_config.json (BOS, EOS,
    chat template), chat_template.jinja and generation_config.json (more stop ids) where present."""
    directory = _existing(directory)
    read = lambda name: read_json(directory / name) if (directory / name).is_file() else {}  # noqa: E731
    spec, config, generation = read("tokenizer.json"), read("tokenizer_config.json"), read("generation_config.json")
    model, pattern = spec.get("model", {}), _hf_pattern(spec.get("pre_tokenizer"))
    if model.get("type") == "BPE" and model.get("byte_fallback") and _is_llama2(spec):
        special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        pieces = [""] * (max([*model["vocab"].values(), *special.values()]) + 1)
        for piece, i in (*model["vocab"].items(), *special.items()):
            pieces[i] = piece
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
        bos, eos = (t["content"] if isinstance(t, dict) else t
                    for t in (config.get("bos_token", "<s>"), config.get("eos_token", "</s>")))
        stop = generation.get("eos_token_id", [])
        return SentencePieceTokenizer(
            pieces, merges, special, bos_id=special.get(bos), eos_id=special.get(eos),
            add_bos=config.get("add_bos_token", True), unk_id=special.get(model.get("unk_token")),
            chat_template=config.get("chat_template"), stop_ids=stop if isinstance(stop, list) else [stop])
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


def load(path: str | Path) -> BaseTokenizer:
    """The tokenizer at `path`: a .gguf file, or a directory with Tokenizer.save's files, an HF tokenizer.json, or
    a Llama-3 tiktoken `tokenizer.model` (which holds no special tokens: Llama 3.1's follow its ranks)."""
    path = _existing(path)
    if path.is_file() and path.suffix == ".gguf":
        return from_gguf(path)
    if (path / META_FILE).is_file():
        try:
            if "sentencepiece" in (meta := read_json(path / META_FILE)):
                return SentencePieceTokenizer(**meta.pop("sentencepiece"), **meta)
            return Tokenizer(_read_ranks(path / RANKS_FILE), **meta)
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
        raise UserError(f"Could not read {path} as a tiktoken BPE file; for a SentencePiece tokenizer.model (Llama "
                        "2), give the checkpoint's tokenizer.json or a GGUF of it instead.") from None


def _existing(path: str | Path) -> Path:
    if not (path := Path(path)).exists():
        raise UserError(f"{path} does not exist; pass a .gguf file or a directory holding a tokenizer.")
    return path
