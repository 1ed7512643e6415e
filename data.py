"""Documents in, packed training windows out.

`load_documents` reads a corpus, one *source* (domain) per path: a file, or a directory of files (.txt and .md hold
one document each; .jsonl, .json and .parquet one per record). It tokenises the text as plain text (no control tokens)
and caches the tokens on disk. `PackedStream` draws the documents epoch by epoch with the data mix of Fu et al. 2024:
each source keeps its share of the tokens, and long documents are upsampled within their source. It joins them and
cuts the stream into windows, deterministically, and resumes from a few integers.

    docs = load_documents(DataConfig(paths=["data/corpus/books", "data/corpus/python-docs"]), tok)
    stream = PackedStream(docs, 32768, prefix=[tok.bos_id], upsample_long=5, rank=rank, world_size=world_size)
    tokens, doc_ids = stream.next_batch(1)  # (1, 32769) each: inputs tokens[:, :-1], targets tokens[:, 1:]
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from errors import UserError

FORMATS = (".txt", ".md", ".jsonl", ".json", ".parquet")
CACHE_VERSION = 1  # bump when what a cache file holds, or how text becomes tokens, changes
EVAL_KEY = b"longgen-eval"  # held out: the documents whose keyed hash of their text falls below eval_fraction


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # files or directories; each entry is one *source* (domain)
    text_field: str = "text"          # column/field for .jsonl/.json/.parquet
    upsample_long: float = 1.0        # within a source, docs of >= long_doc_tokens are drawn this many times as often
    long_doc_tokens: int = 8192
    eval_fraction: float = 0.0        # share of each source's documents held out for eval (a keyed hash of the text)
    num_proc: int = 2                 # parallel tokenisation (threads: tiktoken releases the GIL)
    cache_dir: str = ".cache/tokens"  # tokenised documents cached here, keyed by file content + tokenizer identity


# ------------------------------------------------------------------------------------------------ reading a corpus
def load_documents(cfg: DataConfig, tokenizer, split: str = "train") -> dict[str, list[np.ndarray]]:
    """source name -> token arrays (uint32), one per non-empty document of `split` ("train" or "eval"), tokenised
    with `encode_ordinary`. A source is named after its file's stem or its directory, and left out if the split has
    none of its documents. Each file's tokens are cached in `cfg.cache_dir`, keyed by the file's content, the
    tokenizer and the text field; the split is chosen after the cache, from a keyed hash of each document's text
    (equal documents fall on the same side)."""
    if split not in ("train", "eval"):
        raise UserError(f"Unknown split {split!r}; use 'train' or 'eval'.")
    if not 0 <= cfg.eval_fraction < 1:
        raise UserError(f"eval_fraction={cfg.eval_fraction} must be in [0, 1); set DataConfig.eval_fraction so.")
    if split == "eval" and cfg.eval_fraction == 0:
        raise UserError("There is no eval split with eval_fraction=0; set DataConfig.eval_fraction above 0.")
    sources = _sources(cfg.paths)  # name -> files
    tokenizer_id = tokenizer.fingerprint()
    cached = {f: _cache_file(cfg, f, tokenizer_id) for files in sources.values() for f in files}
    if todo := [f for f, c in cached.items() if not c.is_file()]:
        bar = tqdm(desc=f"tokenising {len(todo)} files", unit="doc", total=0)
        with ThreadPoolExecutor(max(cfg.num_proc, 1)) as pool, bar:
            for f in todo:
                texts = _read(f, cfg.text_field)
                bar.total += len(texts)
                docs = []
                for ids in pool.map(tokenizer.encode_ordinary, texts):
                    docs.append(ids)
                    bar.update()
                _save(cached[f], docs, [_text_hash(t) for t in texts])
    out = {}
    for name, files in sources.items():
        out[name] = []
        for f in files:
            with np.load(cached[f], allow_pickle=False) as z:
                tokens, offsets, held_out = z["tokens"], z["offsets"], z["hashes"] / 2.0**64 < cfg.eval_fraction
            out[name] += [doc for doc, h in zip(np.split(tokens, offsets[1:-1]), held_out)
                          if len(doc) and h == (split == "eval")]
    if not (out := {name: docs for name, docs in out.items() if docs}):
        raise UserError(f"The {split} split of {', '.join(cfg.paths)} holds no text; add documents"
                        f"{' or raise eval_fraction' if split == 'eval' else ''}.")
    return out


def _sources(paths: list[str]) -> dict[str, list[Path]]:
    """Source name -> its files: the file itself, or every supported file under the directory, sorted."""
    if not paths:
        raise UserError("No data given; set DataConfig.paths to files or directories of documents.")
    sources = {}
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path} does not exist; give existing files or directories in DataConfig.paths.")
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix.lower() in FORMATS and f.is_file())
            if not files:
                raise UserError(f"{path} holds no {', '.join(FORMATS)} file; add documents or give another path.")
        elif path.suffix.lower() not in FORMATS:
            raise UserError(f"{path} is not a {', '.join(FORMATS)} file; convert it or give another path.")
        name = path.name if path.is_dir() else path.stem
        if name in sources:
            raise UserError(f"Two data paths are named {name!r}; rename one (a source is named after its path).")
        sources[name] = files if path.is_dir() else [path]
    return sources


def _read(path: Path, text_field: str) -> list[str]:
    """The documents of a file: the whole of a .txt or .md (UTF-8, bad bytes as U+FFFD), else each record's
    `text_field` (.parquet; .jsonl; .json as one array or as JSON lines)."""
    if path.suffix.lower() in (".txt", ".md"):
        return [path.read_bytes().decode("utf-8", "replace")]
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq  # only parquet corpora need pyarrow

        if text_field not in pq.read_schema(path).names:
            raise UserError(f"{path} has no column {text_field!r}; set DataConfig.text_field to the text column.")
        texts = pq.read_table(path, columns=[text_field]).column(0).to_pylist()
    else:
        texts = [r.get(text_field) if isinstance(r, dict) else None for r in _json_records(path)]
    if (bad := next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)) is not None:
        raise UserError(f"Record {bad} of {path} has no text in field {text_field!r}; set DataConfig.text_field to "
                        "the field that holds the documents, or fix that record.")
    return texts


def _json_records(path: Path) -> list:
    """The records of a .jsonl file, or of a .json file holding one array or JSON lines."""
    text = path.read_bytes().decode("utf-8", "replace")
    whole = path.suffix.lower() == ".json" and text.lstrip().startswith("[")
    records = []
    for n, line in enumerate([text] if whole else text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            where = "" if whole else f" line {n}"
            raise UserError(f"{path}{where} is not valid JSON ({e}); fix or remove that record.") from None
    return records[0] if whole else records


def _cache_file(cfg: DataConfig, path: Path, tokenizer_id: str) -> Path:
    with open(path, "rb") as f:
        content = hashlib.file_digest(f, "sha256").hexdigest()
    text_field = "" if path.suffix.lower() in (".txt", ".md") else cfg.text_field
    key = f"{CACHE_VERSION} {tokenizer_id} {path.suffix.lower()} {text_field!r} {content}"
    return Path(cfg.cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=EVAL_KEY).digest())


def _save(path: Path, docs: list[list[int]], hashes: list[int]) -> None:
    """Write one file's documents as an .npz (no pickle): tokens joined, their offsets, their text hashes. Atomic:
    written to a temporary file, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = [len(d) for d in docs]
    tokens = np.fromiter(itertools.chain.from_iterable(docs), np.uint32, sum(lengths))
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        np.savez(f, tokens=tokens, offsets=np.cumsum([0, *lengths]), hashes=np.array(hashes, np.uint64))
    os.replace(f.name, path)


# ------------------------------------------------------------------------------------------------ packing
class PackedStream:
    """Deterministic stream of packed training windows: rank `rank` of `world_size` takes windows r, r + W, r + 2W,
    ... of one global stream, which every rank computes alike.

    Drawing (Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K Context"): a document of L tokens
    in a source of N tokens has weight w = upsample_long if L >= long_doc_tokens else 1, and is drawn
    c = w * N / sum(w' * L' over the source's documents) times per epoch in expectation (floor(c), plus one more with
    probability frac(c)). So each source contributes N tokens per epoch in expectation (the corpus's domain mix), and
    within a source the long documents' share of the tokens rises from p to p * u / (p * u + 1 - p); with
    upsample_long = 1 every document is drawn exactly once. All draws of an epoch are shuffled together, so sources
    are interleaved throughout, not one after the other.

    Packing: each drawn document becomes prefix + tokens + suffix, the epoch's documents are joined, and the result is
    cut into windows of seq_len + 1 tokens (inputs = w[:-1], targets = w[1:]); the epoch's last partial window is
    dropped. Epoch e's draw depends only on (seed, e), so the window at any position is found without replaying
    (cumulative lengths and a binary search); the state is the epoch and the position in it. Empty documents are
    skipped.
    """

    def __init__(self, docs: dict[str, list[np.ndarray]], seq_len: int, *, seed: int = 0, upsample_long: float = 1.0,
                 long_doc_tokens: int = 8192, prefix: Sequence[int] = (), suffix: Sequence[int] = (), rank: int = 0,
                 world_size: int = 1):
        if seq_len < 1 or seed < 0 or upsample_long <= 0 or not 0 <= rank < world_size:
            raise UserError(f"PackedStream needs seq_len >= 1, seed >= 0, upsample_long > 0 and 0 <= rank < "
                            f"world_size (got {seq_len}, {seed}, {upsample_long}, {rank}, {world_size}); fix those.")
        docs = {name: kept for name, ds in docs.items() if (kept := [d for d in ds if len(d)])}
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self._names = list(docs)
        self._docs = [d for ds in docs.values() for d in ds]
        self._source = np.repeat(np.arange(len(docs)), [len(ds) for ds in docs.values()])  # (D,) source of each doc
        self._lengths = np.array([len(d) for d in self._docs], dtype=np.int64)             # (D,)
        self._prefix, self._suffix = np.asarray(prefix, np.int64), np.asarray(suffix, np.int64)
        self._wrapped = self._lengths + len(self._prefix) + len(self._suffix)                # (D,) with prefix+suffix
        if self._wrapped.sum() < seq_len + 1:
            raise UserError(f"The corpus holds {self._wrapped.sum()} tokens, fewer than one window of seq_len + 1 = "
                            f"{seq_len + 1}; give more documents or a shorter seq_len.")
        self._long = self._lengths >= long_doc_tokens
        weight = np.where(self._long, upsample_long, 1.0)
        tokens = np.bincount(self._source, weights=self._lengths)           # (S,) N per source
        weighted = np.bincount(self._source, weights=weight * self._lengths)  # (S,) sum of w * L per source
        self._expected = weight * (tokens / weighted)[self._source]          # (D,) expected draws per epoch
        setting = (seq_len, seed, upsample_long, long_doc_tokens, self._prefix.tolist(), self._suffix.tolist(),
                   self._names, hashlib.sha256(self._lengths.tobytes()).hexdigest())
        self._fingerprint = int(hashlib.sha256(repr(setting).encode()).hexdigest()[:12], 16)  # for load_state_dict
        self._start_epoch(0)
        self._next = 0  # position in the current epoch of the next global window group (rank 0's next window)

    def _start_epoch(self, epoch: int) -> None:
        """Draw epoch `epoch`: its documents in order and where each starts in the joined stream."""
        rng = np.random.default_rng([self.seed, epoch])
        draws = np.floor(self._expected) + (rng.random(len(self._docs)) < self._expected % 1)  # (D,)
        self._order = rng.permutation(np.repeat(np.arange(len(self._docs)), draws.astype(np.int64)))
        self._starts = np.concatenate([[0], np.cumsum(self._wrapped[self._order])])  # (len(order) + 1,)
        self._n_windows = int(self._starts[-1]) // (self.seq_len + 1)
        self._epoch = epoch

    def _seek(self, j: int) -> int:
        """Move on through the epochs until position j (counted from the current epoch's start) lies in the current
        one; return j counted from its start."""
        while j >= self._n_windows:
            j, self._next = j - self._n_windows, self._next - self._n_windows
            self._start_epoch(self._epoch + 1)
        return j

    def _slice(self, doc: int, lo: int, hi: int) -> np.ndarray:
        """Tokens lo:hi of document `doc` wrapped as prefix + tokens + suffix."""
        tokens, p = self._docs[doc], len(self._prefix)
        return np.concatenate([self._prefix[lo:hi], tokens[max(lo - p, 0):max(hi - p, 0)],
                               self._suffix[max(lo - p - len(tokens), 0):max(hi - p - len(tokens), 0)]])

    def _window(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Window j of the current epoch: tokens and document numbers, (seq_len + 1,) each."""
        a, b = j * (self.seq_len + 1), (j + 1) * (self.seq_len + 1)  # its span in the epoch's joined stream
        k = int(np.searchsorted(self._starts, a, side="right")) - 1  # the drawn document it starts in
        pieces = []
        while self._starts[k] < b:
            start = self._starts[k]
            pieces.append(self._slice(self._order[k], max(a, start) - start, min(b, self._starts[k + 1]) - start))
            k += 1
        doc_ids = np.repeat(np.arange(len(pieces), dtype=np.int32), [len(p) for p in pieces])
        return np.concatenate(pieces, dtype=np.int64), doc_ids

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, seq_len + 1) int64, doc_ids (B, seq_len + 1) int32). doc_ids number the documents inside each
        window from 0, non-decreasing (a window that starts mid-document counts that piece as its document 0)."""
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be at least 1.")
        rows = [self._window(self._seek(self._next + b * self.world_size + self.rank)) for b in range(batch_size)]
        self._next += batch_size * self.world_size
        self._seek(self._next)  # so that every rank holds the same state
        tokens, doc_ids = zip(*rows)
        return torch.from_numpy(np.stack(tokens)), torch.from_numpy(np.stack(doc_ids))  # (B, T + 1) each

    def state_dict(self) -> dict:
        """Where the stream is (the same on every rank), as JSON-serialisable ints."""
        return {"epoch": self._epoch, "window": self._next, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output: the same windows follow, bit for bit, whatever the world size."""
        if state.get("fingerprint") != self._fingerprint:
            raise UserError("This data state was saved with other documents or stream settings; resume with the "
                            "same corpus, seq_len, seed, upsampling, prefix and suffix, or start afresh.")
        self._start_epoch(state["epoch"])
        self._next = state["window"]

    def stats(self) -> dict:
        """The epoch, its windows, and per source: documents, long documents, tokens in the corpus and in this epoch's
        draw (counts, and shares of all sources), and the long documents' share of the source's tokens in the corpus
        and in the draw (the upsampling's effect). Document tokens only: prefix and suffix are not counted."""
        drawn = np.bincount(self._order, minlength=len(self._docs)) * self._lengths  # (D,) tokens drawn per doc
        sources = {}
        for s, name in enumerate(self._names):
            mine, long = self._source == s, (self._source == s) & self._long
            sources[name] = dict(
                docs=int(mine.sum()), long_docs=int(long.sum()),
                corpus_tokens=int(self._lengths[mine].sum()), drawn_tokens=int(drawn[mine].sum()),
                corpus_share=float(self._lengths[mine].sum() / self._lengths.sum()),
                drawn_share=float(drawn[mine].sum() / drawn.sum()),
                long_share_corpus=float(self._lengths[long].sum() / self._lengths[mine].sum()),
                long_share_drawn=float(drawn[long].sum() / drawn[mine].sum()))
        return {"epoch": self._epoch, "windows_in_epoch": self._n_windows, "sources": sources}
