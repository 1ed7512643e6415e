"""Documents in, packed training windows out.

`load_documents` gives each source's documents of a split, tokenised once into a memory-mapped token store
(token_store.py: files and directories of .txt/.md/.jsonl/.json/.parquet, `Dataset.save_to_disk` directories, and
`hf:NAME[:split]` Hub datasets). `PackedStream` draws the documents epoch by epoch with the data mix of Fu et al. 2024:
each source keeps its share of the tokens, and long documents are upsampled within their source. It joins them and
cuts the stream into windows, deterministically, reads only the windows of its rank, and resumes from a few integers.
A rank's memory holds a few numbers per document, not the tokens.

    docs = load_documents(DataConfig(paths=["data/corpus/books", "data/corpus/python-docs"]), tok)
    stream = PackedStream(docs, 32768, prefix=[tok.bos_id], upsample_long=5, rank=rank, world_size=world_size)
    tokens, doc_ids = stream.next_batch(1)  # (1, 32769) each: inputs tokens[:, :-1], targets tokens[:, 1:]
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from errors import UserError
from training.token_store import Documents, split_documents, token_stores


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # each entry is one *source* (domain): files, directories, hf:NAME
    text_field: str = "text"          # column/field for .jsonl/.json/.parquet, save_to_disk and Hub datasets
    upsample_long: float = 1.0        # within a source, docs of >= long_doc_tokens are drawn this many times as often
    long_doc_tokens: int = 8192
    eval_fraction: float = 0.0        # share of each source's documents held out for eval (a keyed hash of the text)
    num_proc: int = 0                 # tokenising processes (0: one per CPU core)
    cache_dir: str = ".cache/tokens"  # token stores, keyed by source content + tokenizer identity + text field


# ------------------------------------------------------------------------------------------------ reading a corpus
def load_documents(cfg: DataConfig, tokenizer, split: str = "train") -> dict[str, Documents]:
    """source name -> its non-empty documents of `split` ("train" or "eval"), tokenised with `encode_ordinary` (token
    stores built on first use, then memory-mapped). A source is named after its file's stem, its directory, or the
    Hub dataset's name, and left out if the split has none of its documents. The split is chosen from a keyed hash of
    each document's text (equal documents fall on the same side)."""
    if split not in ("train", "eval"):
        raise UserError(f"Unknown split {split!r}; use 'train' or 'eval'.")
    if not 0 <= cfg.eval_fraction < 1:
        raise UserError(f"eval_fraction={cfg.eval_fraction} must be in [0, 1); set DataConfig.eval_fraction so.")
    if split == "eval" and cfg.eval_fraction == 0:
        raise UserError("There is no eval split with eval_fraction=0; set DataConfig.eval_fraction above 0.")
    out = {}
    for s, store in token_stores(cfg, tokenizer):
        docs = split_documents(store, split, cfg.eval_fraction)
        if docs is None:
            raise UserError(f"{s.path} holds no text; add documents to it or remove it from DataConfig.paths.")
        if len(docs):
            out[s.name] = docs
    if not out:
        raise UserError(f"The {split} split of {', '.join(cfg.paths)} holds no text; add documents"
                        f"{' or raise eval_fraction' if split == 'eval' else ''}.")
    return out


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

    Memory: a few numbers per document (lengths, where each starts, the epoch's order); the tokens stay in the stores
    and only this rank's windows are read.
    """

    def __init__(self, docs: Mapping[str, Documents | Sequence[np.ndarray]], seq_len: int, *, seed: int = 0,
                 upsample_long: float = 1.0, long_doc_tokens: int = 8192, prefix: Sequence[int] = (),
                 suffix: Sequence[int] = (), rank: int = 0, world_size: int = 1):
        if seq_len < 1 or seed < 0 or upsample_long <= 0 or not 0 <= rank < world_size:
            raise UserError(f"PackedStream needs seq_len >= 1, seed >= 0, upsample_long > 0 and 0 <= rank < "
                            f"world_size (got {seq_len}, {seed}, {upsample_long}, {rank}, {world_size}); fix those.")
        sources = {name: kept for name, ds in docs.items() if len(kept := Documents.of(ds).nonempty())}
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self._names = list(sources)
        self._sources = list(sources.values())
        self._source = np.repeat(np.arange(len(sources)), [len(ds) for ds in sources.values()])  # (D,) source of each
        self._doc_start = np.concatenate([np.zeros(0, np.int64), *(ds.starts for ds in self._sources)])  # (D,)
        self._lengths = np.concatenate([np.zeros(0, np.int64), *(ds.lengths for ds in self._sources)])   # (D,)
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
        draws = np.floor(self._expected) + (rng.random(len(self._lengths)) < self._expected % 1)  # (D,)
        self._order = rng.permutation(np.repeat(np.arange(len(self._lengths)), draws.astype(np.int64)))
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
        p, n, start = len(self._prefix), int(self._lengths[doc]), int(self._doc_start[doc])
        tokens = self._sources[self._source[doc]].read(start + min(max(lo - p, 0), n), start + min(max(hi - p, 0), n))
        return np.concatenate([self._prefix[lo:hi], tokens, self._suffix[max(lo - p - n, 0):max(hi - p - n, 0)]])

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
        drawn = np.bincount(self._order, minlength=len(self._lengths)) * self._lengths  # (D,) tokens drawn per doc
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
