"""Token stores: each source of a corpus tokenised once into files that every process memory-maps.

A source is one entry of `DataConfig.paths`:
- a file, or a directory of files: .txt and .md hold one document each; .jsonl, .json and .parquet one per record;
- a directory written by Hugging Face `Dataset.save_to_disk` (read with `datasets`);
- `hf:NAME[:split]` or `hf:NAME:config:split`, a Hugging Face Hub dataset, streamed (never downloaded whole); this
  needs the network once, and then reads from the store offline.

Its text is tokenised as plain text (no control tokens), in worker processes, into a *store* under `cache_dir`: one
flat file of tokens (uint16 when the vocabulary fits, else uint32), the documents' offsets and the keyed hashes that
pick the held-out documents. A store is named by a hash of the source's content, the tokenizer and the text field, and
written into a temporary directory renamed into place, so it exists only once it is whole. The work is cut into tasks
of about TASK_BYTES of text; each finished task is kept as a part file until its store is whole, so an interrupted run
resumes where it stopped. `datasets` is imported only for save_to_disk and Hub sources.

    for source, store in token_stores(cfg, tok):           # built first where missing
        docs = split_documents(store, "train", cfg.eval_fraction)  # memory-mapped documents
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from tqdm import tqdm

from errors import UserError, write_atomic

if TYPE_CHECKING:
    from training.data import DataConfig

FORMATS = (".txt", ".md", ".jsonl", ".json", ".parquet")
CACHE_VERSION = 2  # bump when what a store holds, or how text becomes tokens, changes
EVAL_KEY = b"longgen-eval"  # held out: the documents whose keyed hash of their text falls below eval_fraction
TASK_BYTES = 4 << 20  # text per tokenising task: a few seconds of one core, and what an interrupted run redoes
HUB_PREFIX = "hf:"


# ------------------------------------------------------------------------------------------------ documents
class Documents(Sequence):
    """One source's documents of one split: `tokens` is the source's flat token array (memory-mapped from its store,
    or in memory), document i is tokens[starts[i]:ends[i]]. Indexing gives that view; nothing is copied."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, path: Path | None = None):
        self.tokens, self.starts, self.ends = tokens, np.asarray(starts, np.int64), np.asarray(ends, np.int64)
        self._path, self._file = path, None

    @classmethod
    def of(cls, docs: Documents | Sequence) -> Documents:
        """Documents as they are, or a sequence of token arrays joined in memory (tests, synthetic data)."""
        if isinstance(docs, Documents):
            return docs
        arrays = [np.asarray(d).ravel() for d in docs]
        ends = np.cumsum([len(a) for a in arrays], dtype=np.int64)
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
        return cls(tokens, ends - [len(a) for a in arrays], ends)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def nonempty(self) -> Documents:
        keep = self.ends > self.starts
        return self if keep.all() else Documents(self.tokens, self.starts[keep], self.ends[keep], self._path)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Documents(self.tokens, self.starts[i], self.ends[i], self._path)
        return self.tokens[self.starts[i]:self.ends[i]]

    def __iter__(self):
        return (self.tokens[a:b] for a, b in zip(self.starts.tolist(), self.ends.tolist()))

    def read(self, lo: int, hi: int) -> np.ndarray:
        """tokens[lo:hi] as a new array. From a store it is read from the file (pread), not through the mapping: the
        pages read do not stay mapped, so a process that streams the whole corpus keeps a flat resident size."""
        if self._path is None or hi <= lo:
            return self.tokens[lo:hi]
        if self._file is None:
            self._file = open(self._path, "rb", buffering=0)
        size = self.tokens.itemsize
        return np.frombuffer(os.pread(self._file.fileno(), (hi - lo) * size, lo * size), self.tokens.dtype)


# ------------------------------------------------------------------------------------------------ sources
def token_stores(cfg: DataConfig, tokenizer) -> list[tuple[Source, Path]]:
    """Each source of cfg.paths and the directory of its store, which is built first where it is missing."""
    tokenizer_id = tokenizer.fingerprint()
    sources = [s._replace(hub=(*s.hub, _hub_revision(s, cfg, tokenizer_id))) if s.kind == "hub" else s
               for s in _sources(cfg.paths)]
    contents = [_content(s, cfg) for s in sources]
    stores = [_store_dir(s, content, cfg, tokenizer_id) for s, content in zip(sources, contents)]
    if todo := [i for i, store in enumerate(stores) if not (store / "meta.json").is_file()]:
        build_stores([sources[i] for i in todo], [contents[i] for i in todo], [stores[i] for i in todo], cfg,
                     tokenizer)
    return list(zip(sources, stores))


class Source(NamedTuple):
    name: str
    path: str           # as given in DataConfig.paths
    kind: str           # "files", "arrow" (a Dataset.save_to_disk directory) or "hub"
    files: list[Path]   # files: the documents' files; arrow: every file of the directory; hub: none
    hub: tuple = ()     # hub: (name, config or None, split, and once resolved the revision)


def _sources(paths: list[str]) -> list[Source]:
    """Each path's source: its kind, and its files sorted (a directory's supported files, recursively)."""
    if not paths:
        raise UserError("No data given; set DataConfig.paths to files or directories of documents.")
    sources = []
    for given in map(str, paths):
        path = Path(given)
        if given.startswith(HUB_PREFIX):
            parts = given[len(HUB_PREFIX):].split(":")
            if not parts[0] or len(parts) > 3 or not all(parts):
                raise UserError(f"{given!r} is not a Hub dataset; write hf:NAME, hf:NAME:split or "
                                "hf:NAME:config:split.")
            hub = (parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else "train")
            source = Source(parts[0].rsplit("/", 1)[-1], given, "hub", [], hub)
        elif not path.exists():
            raise UserError(f"{path} does not exist; give existing files or directories in DataConfig.paths.")
        elif path.is_dir() and (path / "dataset_dict.json").is_file():
            splits = ", ".join(_read_json(path / "dataset_dict.json").get("splits", []))
            raise UserError(f"{path} holds a DatasetDict (splits: {splits}); give one split's directory, e.g. "
                            f"{path / 'train'}.")
        elif path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            source = Source(path.name, given, "arrow", sorted(f for f in path.rglob("*") if f.is_file()))
        elif path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix.lower() in FORMATS and f.is_file())
            if not files:
                raise UserError(f"{path} holds no {', '.join(FORMATS)} file; add documents or give another path.")
            source = Source(path.name, given, "files", files)
        elif path.suffix.lower() not in FORMATS:
            raise UserError(f"{path} is not a {', '.join(FORMATS)} file; convert it or give another path.")
        else:
            source = Source(path.stem, given, "files", [path])
        if any(s.name == source.name for s in sources):
            raise UserError(f"Two data paths are named {source.name!r}; rename one (a source is named after its "
                            "path).")
        sources.append(source)
    return sources


def _digests(source: Source, cfg: DataConfig) -> list[str]:
    """The sha256 of each of the source's files. Remembered in cache_dir/digests by path, size, inode and times (as
    git's index does), so that gigabytes of text are not read again at every start; a file that changed is read."""
    name = hashlib.sha256(str(Path(source.path).resolve()).encode()).hexdigest()[:32]
    memo_file = Path(cfg.cache_dir) / "digests" / f"{name}.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    digests, fresh = [], {}
    for f in source.files:
        st = f.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        if (known := memo.get(str(f))) and known[:4] == stamp:
            digest = known[4]
        else:
            with open(f, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        digests.append(digest)
        fresh[str(f)] = [*stamp, digest]
    if fresh != memo:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo_file, json.dumps(fresh))
    return digests


def _text_field(path: Path, text_field: str) -> str:
    return "" if path.suffix.lower() in (".txt", ".md") else text_field


def _content(source: Source, cfg: DataConfig) -> list:
    """What the source's tokens depend on, besides the tokenizer: each file's suffix, text field and sha256, in
    order; for a save_to_disk directory the text field and its files; for a Hub dataset the text field, its name,
    config, split and revision."""
    if source.kind == "files":
        return [(f.suffix.lower(), _text_field(f, cfg.text_field), d) for f, d in zip(source.files,
                                                                                    _digests(source, cfg))]
    if source.kind == "arrow":
        root = Path(source.path)
        return [cfg.text_field, *((f.relative_to(root).as_posix(), d) for f, d in zip(source.files,
                                                                                    _digests(source, cfg)))]
    return [cfg.text_field, *source.hub]


def _store_dir(source: Source, content: list, cfg: DataConfig, tokenizer_id: str) -> Path:
    """The source's store, named by a hash of its content and the tokenizer."""
    key = repr((CACHE_VERSION, tokenizer_id, source.kind, content))
    return Path(cfg.cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:32]


def _hub_revision(source: Source, cfg: DataConfig, tokenizer_id: str) -> str:
    """The Hub dataset's current commit; offline, the newest one a store was built from (so offline runs work once
    the dataset was streamed)."""
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and (commit := _hub_commit(source.hub[0])) is not None:
        return commit
    built = []
    for meta in Path(cfg.cache_dir).glob("*/meta.json"):
        m = _read_json(meta)
        if (m.get("source"), m.get("hub"), m.get("tokenizer"), m.get("text_field")) == \
                ("hub", list(source.hub), tokenizer_id, cfg.text_field):
            built.append((meta.stat().st_mtime, m["revision"]))
    if not built:
        raise UserError(f"{source.path} must be streamed from the Hugging Face Hub once, and this machine is "
                        f"offline; connect it (unset HF_HUB_OFFLINE), or give a local copy (Dataset.save_to_disk).")
    return max(built)[1]


def _hub_commit(name: str) -> str | None:
    """The commit of a Hub dataset's main branch; None when the Hub cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return HfApi().dataset_info(name, timeout=30).sha
    except RepositoryNotFoundError:
        raise UserError(f"{HUB_PREFIX}{name} is not a dataset on the Hugging Face Hub (or it is private: log in "
                        "with `hf auth login`); check the name.") from None
    except Exception:  # no network, or the Hub is down: the cache may have it
        return None


# ------------------------------------------------------------------------------------------------ token stores
def split_documents(directory: str | Path, split: str, eval_fraction: float) -> Documents | None:
    """The non-empty documents of `split` in a store (None if the store holds no token at all): held out are those
    whose text hash, as a fraction of 2**64, falls below eval_fraction."""
    tokens, offsets, hashes = open_store(directory)
    if offsets[-1] == 0:
        return None
    held_out = hashes / 2.0**64 < eval_fraction
    keep = (offsets[1:] > offsets[:-1]) & (held_out == (split == "eval"))
    return Documents(tokens, offsets[:-1][keep], offsets[1:][keep], Path(directory) / "tokens.bin")


def write_store(target: Path, chunks, dtype, meta: dict) -> None:
    """Write a store from chunks of documents, in order: (tokens, lengths, text hashes) each. Into a temporary
    directory, renamed to `target` when whole (if another process put the same store there first, its stays)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        lengths, hashes = [np.zeros(0, np.int64)], [np.zeros(0, np.uint64)]
        with open(tmp / "tokens.bin", "wb") as f:
            for tokens, n, h in chunks:
                np.asarray(tokens).astype(dtype, copy=False).tofile(f)
                lengths.append(np.asarray(n, np.int64))
                hashes.append(np.asarray(h, np.uint64))
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "hashes.npy", np.concatenate(hashes))
        meta = dict(meta, version=CACHE_VERSION, dtype=np.dtype(dtype).name, documents=len(offsets) - 1,
                    tokens=int(offsets[-1]))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_store(directory: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A store's (tokens (T,) memory-mapped, offsets (D + 1,) int64, hashes (D,) uint64)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
        dtype, n, d = np.dtype(meta["dtype"]), meta["tokens"], meta["documents"]
        offsets = np.load(directory / "offsets.npy", allow_pickle=False)
        hashes = np.load(directory / "hashes.npy", allow_pickle=False, mmap_mode="r")
        ok = (directory / "tokens.bin").stat().st_size == n * dtype.itemsize and offsets.shape == (d + 1,) \
            and hashes.shape == (d,) and offsets[0] == 0 and offsets[-1] == n
        tokens = np.memmap(directory / "tokens.bin", dtype, "r", shape=(n,)).view(np.ndarray) if n and ok else \
            np.zeros(0, dtype)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"The token store {directory} is damaged; delete that directory and run again.")
    return tokens, offsets, hashes


class Task(NamedTuple):
    """Documents of one source to tokenise in one go: `read` names the reader, `args` its arguments; `docs` is how
    many there are (None: unknown until read); `key` names the part file, from the content and the tokenizer."""
    read: str
    args: tuple
    docs: int | None
    key: str


def build_stores(sources: list[Source], contents: list[list], targets: list[Path], cfg: DataConfig,
                 tokenizer) -> None:
    """Tokenise `sources` into stores at `targets`: plan the tasks, run the missing ones in `cfg.num_proc` processes
    (a bar counts documents; the total is known before the first one), then join each source's parts."""
    tokenizer_id = tokenizer.fingerprint()
    dtype = np.dtype(np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32)
    parts_dir = Path(cfg.cache_dir) / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    plans = [_plan(s, content, cfg, tokenizer_id) for s, content in zip(sources, contents)]
    tasks = list({t.key: t for plan in plans for t in plan}.values())  # equal content is tokenised once
    todo = [t for t in tasks if not (parts_dir / f"{t.key}.npz").is_file()]
    done = {t.key for t in tasks} - {t.key for t in todo}
    known = all(t.docs is not None for t in tasks)
    bar = tqdm(total=sum(t.docs for t in tasks) if known else None, unit="doc", desc="tokenising", dynamic_ncols=True,
               initial=sum(t.docs or 0 for t in tasks if t.key in done))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_proc = min(cfg.num_proc or cores, len(todo))
    start, n_tokens = time.perf_counter(), 0
    with bar:
        for docs, tokens in _run(todo, n_proc, tokenizer, parts_dir, dtype, cfg.text_field):
            n_tokens += tokens
            bar.update(docs)
            bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)
    if todo:
        elapsed = time.perf_counter() - start
        print(f"Tokenised {n_tokens:,} tokens in {elapsed:.1f} s ({n_tokens / elapsed:,.0f} tokens/s, {n_proc} "
              f"process{'es' if n_proc > 1 else ''}).", file=sys.stderr)
    for source, target, plan in zip(sources, targets, plans):
        meta = dict(path=source.path, source=source.kind, tokenizer=tokenizer_id, text_field=cfg.text_field)
        if source.kind == "hub":
            meta |= dict(hub=list(source.hub[:3]), revision=source.hub[3])
        write_store(target, _parts(parts_dir / f"{t.key}.npz" for t in plan), dtype, meta)
    for t in tasks:
        (parts_dir / f"{t.key}.npz").unlink(missing_ok=True)


def _run(todo: list[Task], n_proc: int, tokenizer, parts_dir: Path, dtype, text_field: str):
    """Yield (documents, tokens) of each task as it finishes: in this process, or in `n_proc` forked ones (a fork
    starts at once; a spawned worker would import torch again, and the tokenizer goes with the fork)."""
    if n_proc <= 1:
        for task in todo:
            yield _tokenise(task, parts_dir, dtype, text_field, tokenizer)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(n_proc, mp_context=context, initializer=_init_worker, initargs=(tokenizer,))
    try:
        pending = {pool.submit(_tokenise, t, parts_dir, dtype, text_field) for t in todo}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()  # a worker's UserError is raised here
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_TOKENIZER = None  # a worker's tokenizer


def _init_worker(tokenizer) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _tokenise(task: Task, parts_dir: Path, dtype, text_field: str, tokenizer=None) -> tuple[int, int]:
    """Read a task's documents, tokenise them and write its part (tokens, lengths, text hashes) atomically."""
    tokenizer = _TOKENIZER if tokenizer is None else tokenizer
    texts = READERS[task.read](*task.args, text_field=text_field)
    docs = [np.array(tokenizer.encode_ordinary(t), dtype) for t in texts]
    lengths = np.array([len(d) for d in docs], np.int64)
    hashes = np.array([_text_hash(t) for t in texts], np.uint64)
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype)
    write_atomic(parts_dir / f"{task.key}.npz", lambda f: np.savez(f, tokens=tokens, lengths=lengths, hashes=hashes))
    return len(texts), len(tokens)


def _parts(paths):
    """Each part's (tokens, lengths, hashes), one part in memory at a time."""
    for path in paths:
        with np.load(path, allow_pickle=False) as z:
            yield z["tokens"], z["lengths"], z["hashes"]


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=EVAL_KEY).digest())


# ------------------------------------------------------------------------------------------------ planning
def _plan(source: Source, content: list, cfg: DataConfig, tokenizer_id: str) -> list[Task]:
    """A source's tasks, in document order, each about TASK_BYTES of text."""
    def task(read: str, args: tuple, docs: int | None, what) -> Task:
        key = repr((CACHE_VERSION, tokenizer_id, read, what))
        return Task(read, args, docs, hashlib.sha256(key.encode()).hexdigest()[:32])

    if source.kind == "hub":
        name, config, split, revision = source.hub
        shards = _hub_stream(name, config, split, revision).n_shards
        return [task("hub", args, None, (cfg.text_field, args))
                for args in ((name, config, split, i, shards, revision) for i in range(shards))]
    if source.kind == "arrow":
        n_rows, step = _arrow_rows(Path(source.path), cfg.text_field)
        return [task("arrow", (source.path, lo, min(lo + step, n_rows)), min(step, n_rows - lo),
                     (content, lo, step)) for lo in range(0, n_rows, step)]
    tasks, group, size = [], [], 0

    def flush():  # consecutive text files share a task
        nonlocal group, size
        if group:
            tasks.append(task("text", (tuple(str(p) for p, _ in group),), len(group), [d for _, d in group]))
        group, size = [], 0

    for f, (suffix, _, digest) in zip(source.files, content):
        if suffix in (".txt", ".md"):
            group.append((f, digest))
            size += f.stat().st_size
            if size >= TASK_BYTES:
                flush()
            continue
        flush()
        if suffix == ".parquet":
            for rows, docs, first in _parquet_groups(f, cfg.text_field):
                tasks.append(task("parquet", (str(f), rows, first), docs, (cfg.text_field, digest, rows)))
        elif suffix == ".json" and _is_json_array(f):
            docs = len(_json_array(f))
            tasks.append(task("json", (str(f),), docs, (cfg.text_field, digest)))
        else:
            for lo, hi, line, first, docs in _json_line_chunks(f):
                tasks.append(task("jsonl", (str(f), lo, hi, line, first), docs, (cfg.text_field, digest, lo, hi)))
    flush()
    return tasks


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip()[:1] == b"["


def _json_line_chunks(path: Path) -> list[tuple[int, int, int, int, int]]:
    """A JSON-lines file cut at line ends into chunks of about TASK_BYTES: (byte lo, byte hi, its first line's
    number, its first record's number, records in it); blank lines are no records."""
    chunks, lo, pos, line, first, records = [], 0, 0, 1, 0, 0
    with open(path, "rb") as f:
        for n, text in enumerate(f, 1):
            pos += len(text)
            records += bool(text.strip())
            if pos - lo >= TASK_BYTES:
                chunks.append((lo, pos, line, first, records - first))
                lo, line, first = pos, n + 1, records
    if pos > lo or not chunks:
        chunks.append((lo, pos, line, first, records - first))
    return chunks


def _parquet_groups(path: Path, text_field: str) -> list[tuple[tuple[int, ...], int, int]]:
    """A parquet file's row groups, joined into tasks of about TASK_BYTES: (row groups, rows, first row)."""
    import pyarrow.parquet as pq  # only parquet corpora need pyarrow

    meta = pq.ParquetFile(path).metadata
    if text_field not in meta.schema.names:
        raise UserError(f"{path} has no column {text_field!r}; set DataConfig.text_field to the text column.")
    column = meta.schema.names.index(text_field)
    tasks, group, size, rows, first = [], [], 0, 0, 0
    for g in range(meta.num_row_groups):
        group.append(g)
        rows += meta.row_group(g).num_rows
        size += meta.row_group(g).column(column).total_uncompressed_size
        if size >= TASK_BYTES:
            tasks.append((tuple(group), rows, first))
            group, size, first, rows = [], 0, first + rows, 0
    if group or not tasks:
        tasks.append((tuple(group), rows, first))
    return tasks


def _arrow_rows(directory: Path, text_field: str) -> tuple[int, int]:
    """A save_to_disk dataset's rows, and how many rows make a task of about TASK_BYTES of text."""
    ds = _load_from_disk(directory)
    if text_field not in ds.column_names:
        raise UserError(f"{directory} has no column {text_field!r} (it has {', '.join(ds.column_names)}); set "
                        "DataConfig.text_field to the text column.")
    size = ds.data.column(text_field).nbytes
    return len(ds), max(1, int(TASK_BYTES * len(ds) / max(size, 1)))


def _load_from_disk(directory):
    import datasets  # only save_to_disk and Hub sources need it

    datasets.disable_progress_bars()
    return datasets.load_from_disk(str(directory))


def _hub_stream(name: str, config: str | None, split: str, revision: str):
    """The Hub dataset streamed (network): an IterableDataset."""
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True, revision=revision)
    except (ValueError, FileNotFoundError) as e:  # an unknown split or config; a gated dataset
        raise UserError(f"{HUB_PREFIX}{name} cannot be streamed as asked ({e}); check its config and split (or log in "
                        "with `hf auth login` for a gated dataset).") from None


# ------------------------------------------------------------------------------------------------ readers
def _decode(data: bytes, path, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 at byte {offset + e.start}; convert it to UTF-8 (e.g. iconv -f "
                        "latin1 -t utf-8) or remove it.") from None


def _texts(records: list, path, first: int, text_field: str) -> list[str]:
    """Each record's text field; a record without one is an error naming it."""
    texts = [r.get(text_field) if isinstance(r, dict) else r for r in records]
    if (bad := next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)) is not None:
        raise UserError(f"Record {first + bad} of {path} has no text in field {text_field!r}; set "
                        "DataConfig.text_field to the field that holds the documents, or fix that record.")
    return texts


def _read_text(paths: tuple[str, ...], text_field: str) -> list[str]:
    return [_decode(Path(p).read_bytes(), p) for p in paths]


def _read_jsonl(path: str, lo: int, hi: int, line: int, first: int, text_field: str) -> list[str]:
    with open(path, "rb") as f:
        f.seek(lo)
        data = f.read(hi - lo)
    records, offset = [], lo
    for n, raw in enumerate(data.split(b"\n"), line):
        if raw.strip():
            try:
                records.append(json.loads(_decode(raw, path, offset)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n} is not valid JSON ({e}); fix or remove that record.") from None
        offset += len(raw) + 1
    return _texts([r if isinstance(r, dict) else None for r in records], path, first, text_field)


def _json_array(path) -> list:
    try:
        records = json.loads(_decode(Path(path).read_bytes(), path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix it.") from None
    if not isinstance(records, list):
        raise UserError(f"{path} is not a JSON array of records; write one array, or one record per line.")
    return records


def _read_json_array(path: str, text_field: str) -> list[str]:
    return _texts([r if isinstance(r, dict) else None for r in _json_array(path)], path, 0, text_field)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"Could not read {path} as JSON ({e}); restore or delete it.") from None


def _read_parquet(path: str, row_groups: tuple[int, ...], first: int, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    if not row_groups:
        return []
    column = pq.ParquetFile(path).read_row_groups(list(row_groups), columns=[text_field]).column(0)
    return _texts(column.to_pylist(), path, first, text_field)


def _read_arrow(directory: str, lo: int, hi: int, text_field: str) -> list[str]:
    return _texts(_load_from_disk(directory).select_columns([text_field])[lo:hi][text_field], directory, lo,
                  text_field)


def _read_hub(name: str, config, split: str, shard: int, shards: int, revision: str, text_field: str) -> list[str]:
    stream = _hub_stream(name, config, split, revision).shard(shards, shard)
    if text_field not in (stream.column_names or [text_field]):
        raise UserError(f"{HUB_PREFIX}{name} has no column {text_field!r} (it has {', '.join(stream.column_names)}); "
                        "set DataConfig.text_field to the text column.")
    return _texts([row.get(text_field) for row in stream], f"{HUB_PREFIX}{name}", 0, text_field)


READERS = {"text": _read_text, "jsonl": _read_jsonl, "json": _read_json_array, "parquet": _read_parquet,
           "arrow": _read_arrow, "hub": _read_hub}
