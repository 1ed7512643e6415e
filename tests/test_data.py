"""training/data.py and training/token_store.py: reading corpora into token stores, and the packed, upsampled,
resumable stream; Tokenizer.encode_ordinary."""
import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from training import token_store
from loading import tokenizer
from training.data import DataConfig, PackedStream, load_documents
from errors import UserError

BOS, EOS = 1, 2  # prefix and suffix in the synthetic streams; document tokens are >= 10


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return tokenizer.load(smollm2_gguf)


def synthetic(lengths_by_source: dict[str, list[int]]) -> dict[str, list[np.ndarray]]:
    """Documents whose tokens say who they are: document k (numbered across sources) is 10 + 1000 k + (0, 1, ...)."""
    docs, k = {}, 0
    for name, lengths in lengths_by_source.items():
        docs[name] = []
        for n in lengths:
            docs[name].append(np.arange(10 + 1000 * k, 10 + 1000 * k + n, dtype=np.uint32))
            k += 1
    return docs


def batches(stream: PackedStream, n: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [tuple(t.numpy() for t in stream.next_batch(batch_size)) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ encode_ordinary
def test_encode_ordinary_reads_special_tokens_as_text(tok):
    text = "Hello <|endoftext|> world<|im_start|>"
    ids = tok.encode_ordinary(text)
    assert {tok._special["<|endoftext|>"], tok._special["<|im_start|>"]} <= set(tok.encode(text))  # encode: special
    assert not set(ids) & set(tok._special.values())  # no special id, BOS included
    assert tok.decode(ids) == text


def test_encode_ordinary_drops_bytes_without_token_as_encode_does(tok):
    text = "a,\x04,b \x06 x\U00040000y"  # \x04, \x06 and the lead byte of U+40000 have no token in SmolLM2
    assert tok.encode_ordinary(text) == tok.encode(text, add_bos=False)
    assert tok.decode(tok.encode_ordinary(text + "<|im_end|>")).endswith("<|im_end|>")


# ------------------------------------------------------------------------------------------------ packing
def test_windows_are_the_joined_wrapped_documents():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 100).tolist()
    lengths[-1] += -(sum(lengths) + 2 * 100) % 51  # the epoch fills its windows exactly: none of it is dropped
    docs = synthetic({"a": lengths[:40], "b": lengths[40:]})
    by_first = {int(d[0]): d for ds in docs.values() for d in ds}
    stream = PackedStream(docs, 50, seed=3, prefix=[BOS], suffix=[EOS])
    orders = []
    for epoch in range(2):
        n_windows = stream.stats()["windows_in_epoch"]
        tokens, doc_ids = (np.concatenate(x).ravel() for x in zip(*batches(stream, n_windows, 1)))  # (n * 51,)
        assert stream.stats()["epoch"] == epoch + 1  # it read exactly this epoch
        windows, ids = tokens.reshape(n_windows, 51), doc_ids.reshape(n_windows, 51)
        assert (ids[:, 0] == 0).all() and set(np.diff(ids, axis=1).ravel()) <= {0, 1}  # from 0, non-decreasing
        assert ((np.diff(ids, axis=1) == 1) == (windows[:, 1:] == BOS)).all()  # a new number exactly at a doc start
        starts = [*np.flatnonzero(tokens == BOS), len(tokens)]
        assert starts[0] == 0
        orders.append([])
        for lo, hi in zip(starts[:-1], starts[1:]):  # the stream is whole wrapped documents, one after another
            d = by_first[int(tokens[lo + 1])]
            assert tokens[lo:hi].tolist() == [BOS, *d.tolist(), EOS]
            orders[-1].append(int(d[0]))
        assert sorted(orders[-1]) == sorted(by_first)  # upsample 1: each document once an epoch
    assert sorted(by_first) != orders[0] != orders[1]  # shuffled, anew each epoch


def test_same_seed_same_stream_other_seed_other_stream():
    docs = synthetic({"a": [37, 5, 300, 80, 12] * 10})
    first, again, other = (batches(PackedStream(docs, 64, seed=s, prefix=[BOS]), 5, 2) for s in (7, 7, 8))
    assert all((x == y).all() for bx, by in zip(first, again) for x, y in zip(bx, by))
    assert not all((x[0] == y[0]).all() for x, y in zip(first, other))


def test_ranks_split_the_one_rank_stream():
    docs = synthetic({"a": [37, 5, 300, 80, 12] * 6, "b": [500, 3]})
    one = batches(PackedStream(docs, 31, seed=1, prefix=[BOS], suffix=[EOS]), 20, 6)
    ranks = [PackedStream(docs, 31, seed=1, prefix=[BOS], suffix=[EOS], rank=r, world_size=2) for r in range(2)]
    for tokens, doc_ids in one:  # 20 steps of 6 windows: several epochs of ~74 windows
        r0, r1 = (s.next_batch(3) for s in ranks)
        assert (tokens[0::2] == r0[0].numpy()).all() and (tokens[1::2] == r1[0].numpy()).all()
        assert (doc_ids[0::2] == r0[1].numpy()).all() and (doc_ids[1::2] == r1[1].numpy()).all()
        assert ranks[0].state_dict() == ranks[1].state_dict()
    assert ranks[0].stats()["epoch"] >= 1


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_gives_the_same_windows(world_size):
    docs = synthetic({"a": [37, 5, 300, 80, 12] * 4, "b": [900, 40, 2000]})
    make = functools.partial(PackedStream, docs, 63, seed=5, upsample_long=3, long_doc_tokens=500, prefix=[BOS],
                             world_size=world_size)
    for rank in range(world_size):
        straight = make(rank=rank)
        batches(straight, 7, 4)  # run a while, save, go on
        state = json.loads(json.dumps(straight.state_dict()))
        epoch = straight.stats()["epoch"]
        expected = batches(straight, 12, 4)
        assert straight.stats()["epoch"] > epoch  # the continuation crosses an epoch boundary
        resumed = make(rank=rank)
        resumed.load_state_dict(state)  # no replay: the position is computed
        for (tokens, doc_ids), (t, d) in zip(expected, batches(resumed, 12, 4), strict=True):
            assert (t == tokens).all() and (d == doc_ids).all()


def test_resume_as_more_ranks_continues_the_stream():
    docs = synthetic({"a": [37, 5, 300, 80, 12] * 4})
    one = PackedStream(docs, 63, seed=2)
    batches(one, 3, 2)
    state = one.state_dict()
    expected = np.concatenate([t for t, _ in batches(one, 5, 4)])  # (20, 64)
    ranks = [PackedStream(docs, 63, seed=2, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.load_state_dict(state)
    got = [np.concatenate([t for t, _ in batches(s, 5, 2)]) for s in ranks]
    assert (expected[0::2] == got[0]).all() and (expected[1::2] == got[1]).all()


# ------------------------------------------------------------------------------------------------ the data mix
def drawn_tokens(stream: PackedStream, epochs: int, first_docs: list[int]) -> np.ndarray:
    """Tokens the stream gives in `epochs` epochs from each group of synthetic documents: first_docs[i] to
    first_docs[i + 1] - 1."""
    counts = 0
    while stream.stats()["epoch"] < epochs:
        counts += np.histogram(stream.next_batch(8)[0].numpy(), [10 + 1000 * k for k in first_docs])[0]
    return counts


def test_upsampling_raises_the_long_share_and_keeps_the_domain_mix():
    # prose: 20,000 tokens in 200 short documents and 20,000 in 20 long ones; code: 20,000 short tokens
    docs = synthetic({"prose": [100] * 200 + [1000] * 20, "code": [100] * 200})
    groups = [0, 200, 220, 420]  # prose short, prose long, code

    stream = PackedStream(docs, 255, seed=0, upsample_long=5, long_doc_tokens=1000)
    short, long, code = drawn_tokens(stream, 6, groups)
    assert long / (short + long) == pytest.approx(5 / 6, abs=0.03)  # 1/2 of prose in the corpus, 5/6 drawn
    assert (short + long) / (short + long + code) == pytest.approx(2 / 3, abs=0.03)  # the domain mix is kept
    stats = PackedStream(docs, 255, upsample_long=5, long_doc_tokens=1000).stats()["sources"]
    assert stats["prose"]["long_share_corpus"] == 0.5 and stats["prose"]["long_docs"] == 20
    assert stats["prose"]["long_share_drawn"] == pytest.approx(5 / 6, abs=0.06)
    assert stats["code"]["drawn_share"] == pytest.approx(1 / 3, abs=0.04)

    plain = PackedStream(docs, 255, seed=0)  # no upsampling: every document once an epoch, shares as in the corpus
    assert all(s["drawn_tokens"] == s["corpus_tokens"] for s in plain.stats()["sources"].values())
    short, long, code = drawn_tokens(plain, 1, groups)
    assert long / (short + long) == pytest.approx(1 / 2, abs=0.02)

    # interleaved: the first tenth of an epoch already has the mix (source after source would give 0 or 1)
    stream = PackedStream(docs, 255, seed=1)
    first_tenth = stream.next_batch(23)[0].numpy()
    assert (first_tenth >= 10 + 1000 * 220).mean() == pytest.approx(1 / 3, abs=0.12)


# ------------------------------------------------------------------------------------------------ reading corpora
TEXTS = ["Call me Ishmael. <|endoftext|> Some years ago", "It is a truth universally acknowledged,", "x = [1, 2, 3]\n",
         "Émile a écrit « bonjour »", "line one\u2028still the same record"]


def write_corpus(root):
    (root / "books" / "more").mkdir(parents=True)
    (root / "books" / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    (root / "books" / "more" / "b.md").write_text(TEXTS[1], encoding="utf-8")
    (root / "books" / "skip.csv").write_text("not read")
    lines = (json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(TEXTS[2:]))  # raw U+2028
    (root / "code.jsonl").write_text("\n".join(lines), encoding="utf-8")
    (root / "arr.json").write_text(json.dumps([{"content": t} for t in TEXTS[3:]]), encoding="utf-8")
    return root


class Counting:
    """The tokenizer, counting the documents it encodes."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode_ordinary(self, text):
        self.calls += 1
        return self.tok.encode_ordinary(text)


def test_load_documents_reads_txt_md_jsonl_json(tok, tmp_path):
    root = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(paths=[str(root / "books"), str(root / "code.jsonl")], cache_dir=str(tmp_path / "cache"))
    docs = load_documents(cfg, tok)
    assert {name: [tok.decode(d) for d in ds] for name, ds in docs.items()} == \
        {"books": TEXTS[:2], "code": TEXTS[2:]}  # directories recursively, sorted; special strings stay text
    assert all(d.dtype == np.uint16 for ds in docs.values() for d in ds)  # SmolLM2's 49,152 ids fit in 16 bits
    assert all(isinstance(ds.tokens.base, np.memmap) for ds in docs.values())  # mapped, not read into memory
    cfg = DataConfig(paths=[str(root / "arr.json")], text_field="content", cache_dir=str(tmp_path / "cache"))
    assert [tok.decode(d) for d in load_documents(cfg, tok)["arr"]] == TEXTS[3:]


def test_load_documents_reads_parquet(tok, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": TEXTS[:3], "n": [1, 2, 3]}), tmp_path / "web.parquet")
    cfg = DataConfig(paths=[str(tmp_path / "web.parquet")], text_field="content", cache_dir=str(tmp_path / "cache"))
    assert [tok.decode(d) for d in load_documents(cfg, tok)["web"]] == TEXTS[:3]
    with pytest.raises(UserError, match="no column 'text'"):
        load_documents(DataConfig(paths=cfg.paths, cache_dir=cfg.cache_dir), tok)


def test_cache_is_used_and_invalidated(tok, tmp_path):
    root = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(paths=[str(root / "books"), str(root / "code.jsonl")], cache_dir=str(tmp_path / "cache"))
    cfg.num_proc = 1  # in this process, where the calls can be counted
    first = load_documents(cfg, counting := Counting(tok))
    assert counting.calls == 5
    again = load_documents(cfg, counting := Counting(tok))
    assert counting.calls == 0  # all from the cache
    assert all((x == y).all() for n in first for x, y in zip(first[n], again[n]))
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 2 and not list((tmp_path / "cache").rglob("*.tmp"))
    assert not list((tmp_path / "cache" / "parts").iterdir())  # the parts are gone once the stores are whole
    (root / "books" / "a.txt").write_text("A new beginning.")
    changed = load_documents(cfg, counting := Counting(tok))
    assert counting.calls == 2 and tok.decode(changed["books"][0]) == "A new beginning."  # books again, code not
    other = tokenizer.Tokenizer(tok._ranks, {}, tokenizer.GPT2)  # another tokenizer: its own cache entries
    load_documents(cfg, counting := Counting(other))
    assert counting.calls == 5


def test_eval_split_is_disjoint_and_stable(tok, tmp_path):
    texts = [f"Document number {i}: " + "words " * (i % 7) for i in range(60)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    cfg = DataConfig(paths=[str(tmp_path / "docs.jsonl")], eval_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    train, held = ([tok.decode(d) for d in load_documents(cfg, tok, split)["docs"]] for split in ("train", "eval"))
    assert not set(train) & set(held) and sorted(train + held) == sorted(texts)
    assert 8 <= len(held) <= 30
    cfg.eval_fraction = 0.5  # a larger share only adds documents to eval
    assert set(held) <= {tok.decode(d) for d in load_documents(cfg, tok, "eval")["docs"]}


# ------------------------------------------------------------------------------------------------ user errors
def test_bad_input_raises_user_error(tok, tmp_path):
    root = write_corpus(tmp_path / "corpus")
    (root / "empty").mkdir()
    (root / "blank.txt").write_text("")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": ')
    (root / "nofield.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    (root / "other" / "books").mkdir(parents=True)
    (root / "other" / "books" / "c.txt").write_text("c")
    cache = str(tmp_path / "cache")
    bad = {"does not exist": [str(root / "missing")], "holds no": [str(root / "empty")],
           "is not a": [str(root / "books" / "skip.csv")], "holds no text": [str(root / "blank.txt")],
           "line 2 is not valid JSON": [str(root / "bad.jsonl")], "Record 1": [str(root / "nofield.jsonl")],
           "named 'books'": [str(root / "books"), str(root / "other/books")],
           "No data": []}
    for message, paths in bad.items():
        with pytest.raises(UserError, match=message):
            load_documents(DataConfig(paths=paths, cache_dir=cache), tok)
    with pytest.raises(UserError, match="no eval split"):
        load_documents(DataConfig(paths=[str(root / "books")], cache_dir=cache), tok, "eval")
    docs = synthetic({"a": [30, 40]})
    for kwargs in (dict(seq_len=0), dict(seq_len=8, rank=2, world_size=2), dict(seq_len=8, upsample_long=0),
                   dict(seq_len=200)):
        with pytest.raises(UserError):
            PackedStream(docs, **kwargs)
    stream = PackedStream(docs, 8)
    with pytest.raises(UserError, match="batch_size"):
        stream.next_batch(0)
    with pytest.raises(UserError, match="other documents or stream settings"):
        PackedStream(docs, 9).load_state_dict(stream.state_dict())


# ------------------------------------------------------------------------------------------------ pinned windows
# The loader's windows on a fixed corpus, as sha256 digests taken from training/data.py before its token store became
# memory-mapped (commit 7f54bdf): any change to reading, splitting, drawing, packing or the fingerprint shows here.
PIN_WORDS = ("the of and to in is was that for it with as his on be at by had not are but from or have an they which "
             "one you were her all she there would their we him been has when who will more no if out so said what "
             "up its about into than them can only other new some could time these two may then do first any my now "
             "such like our over man me even most made after also did many before must through back years where much "
             "your way well down should because each just those people Mr how too little state good very make world "
             "still own see men work long get here between both life being under never day same another know while "
             "last might us great old year off come since against go came right used take three").split()


def pin_text(i: int, n_words: int) -> str:
    """Document i: n_words words picked by a fixed formula, with some punctuation and a line break now and then."""
    words = [PIN_WORDS[(i * 31 + j * j * 7 + j // 3) % len(PIN_WORDS)] for j in range(n_words)]
    return " ".join(w + ("." if (i + j) % 11 == 0 else "\n" if (i + j) % 29 == 0 else "") for j, w in enumerate(words))


def pin_corpus(root):
    """Three sources: a directory of .txt/.md files, a .jsonl file and a .parquet file; some documents long."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (root / "essays" / "deep").mkdir(parents=True)
    for i in range(14):
        suffix = ".md" if i % 4 == 3 else ".txt"
        where = root / "essays" / ("deep" if i % 5 == 2 else "")
        (where / f"e{i:02d}{suffix}").write_text(pin_text(i, 20 + (i * 97) % 900), encoding="utf-8")
    lines = [json.dumps({"text": pin_text(100 + i, 5 + (i * 53) % 400), "id": i}) for i in range(40)]
    (root / "notes.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": [pin_text(200 + i, 30 + (i * 211) % 1500) for i in range(9)]}),
                   root / "web.parquet")
    return [str(root / "essays"), str(root / "notes.jsonl"), str(root / "web.parquet")]


def stream_digest(stream: PackedStream, n: int, batch_size: int) -> str:
    h = hashlib.sha256()
    for tokens, doc_ids in batches(stream, n, batch_size):
        h.update(tokens.astype(np.int64).tobytes())
        h.update(doc_ids.astype(np.int32).tobytes())
    return h.hexdigest()[:16]


PINNED = {  # split: (windows' digest, rank 1 of 2, 40 batches of 3; fingerprint; windows in epoch 0; documents)
    "train": ("6068a1d58a653be2", 227197581797283, 60, {"essays": 8, "notes": 29, "web": 6}),
    "eval": ("f9f7efb591d88353", 149497002301048, 38, {"essays": 6, "notes": 11, "web": 3}),
}


@pytest.mark.parametrize("split", ["train", "eval"])
def test_windows_are_pinned_on_a_tokenised_corpus(tok, tmp_path, split):
    paths = pin_corpus(tmp_path / "corpus")
    cfg = DataConfig(paths=paths, eval_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    docs = load_documents(cfg, tok, split)
    stream = PackedStream(docs, 257, seed=11, upsample_long=3, long_doc_tokens=600, prefix=[tok.bos_id or 1],
                          suffix=[tok.eos_id], rank=1, world_size=2)
    windows = stream.stats()["windows_in_epoch"]
    got = (stream_digest(stream, 40, 3), stream.state_dict()["fingerprint"], windows,
           {name: len(ds) for name, ds in docs.items()})
    assert stream.stats()["epoch"] >= 1  # the pinned windows cross an epoch boundary
    assert got == PINNED[split]


def test_windows_are_pinned_on_synthetic_documents():
    docs = synthetic({"a": [37, 5, 300, 80, 12, 0, 700] * 5, "b": [900, 40, 2000, 3], "c": []})
    stream = PackedStream(docs, 63, seed=5, upsample_long=3, long_doc_tokens=500, prefix=[BOS], suffix=[EOS])
    got = (stream_digest(stream, 30, 4), stream.state_dict()["fingerprint"])
    assert got == ("50e20403750fd12a", 149664396864842)


# ------------------------------------------------------------------------------------------------ token stores
def store_files(cache) -> dict[str, bytes]:
    """Every store's files' bytes, by store-relative name (in source order of paths)."""
    return {f"{meta.parent.name}/{f.name}": f.read_bytes() for meta in sorted(cache.glob("*/meta.json"))
            for f in sorted(meta.parent.iterdir())}


def test_processes_write_the_stores_one_process_writes(tok, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(token_store, "TASK_BYTES", 300)  # many small tasks
    paths = pin_corpus(tmp_path / "corpus")
    stores = []
    for n_proc in (1, 2):
        cfg = DataConfig(paths=paths, num_proc=n_proc, cache_dir=str(tmp_path / f"cache{n_proc}"))
        load_documents(cfg, tok)
        stores.append(store_files(tmp_path / f"cache{n_proc}"))
    assert len(stores[1]) == 12 and stores[0] == stores[1]  # 3 sources x 4 files, byte for byte
    err = capfd.readouterr().err
    assert "0/63 " in err and "63/63 " in err and "tokens/s" in err  # the total (63 documents) is known up front
    assert "2 processes" in err


def test_interrupted_tokenising_resumes_with_the_finished_tasks(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(token_store, "TASK_BYTES", 1)  # a task per file
    root = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(paths=[str(root / "books"), str(root / "code.jsonl")], num_proc=1,
                     cache_dir=str(tmp_path / "cache"))

    class Interrupted(Counting):
        def encode_ordinary(self, text):
            if self.calls == 2:
                raise KeyboardInterrupt  # ctrl-c during the third document (the first of code.jsonl)
            return super().encode_ordinary(text)

    with pytest.raises(KeyboardInterrupt):
        load_documents(cfg, Interrupted(tok))
    cache = tmp_path / "cache"
    assert len(list((cache / "parts").glob("*.npz"))) == 2 and not list(cache.glob("*/meta.json"))
    assert not list(cache.rglob("*.tmp"))  # nothing half-written
    docs = load_documents(cfg, counting := Counting(tok))
    assert counting.calls == 3  # only code.jsonl's 3 records: the two books were done
    assert {name: [tok.decode(d) for d in ds] for name, ds in docs.items()} == {"books": TEXTS[:2], "code": TEXTS[2:]}


def test_large_jsonl_and_parquet_are_cut_into_tasks_in_order(tok, tmp_path, monkeypatch):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(token_store, "TASK_BYTES", 200)
    texts = [pin_text(i, 3 + i % 17) for i in range(50)]
    (tmp_path / "lines.jsonl").write_text("\n\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    pq.write_table(pa.table({"text": texts}), tmp_path / "table.parquet", row_group_size=7)
    cfg = DataConfig(paths=[str(tmp_path / "lines.jsonl"), str(tmp_path / "table.parquet")], num_proc=1,
                     cache_dir=str(tmp_path / "cache"))
    sources = token_store._sources(cfg.paths)
    plans = [token_store._plan(s, token_store._content(s, cfg), cfg, "tok") for s in sources]
    assert min(len(p) for p in plans) > 3 and [sum(t.docs for t in p) for p in plans] == [50, 50]
    docs = load_documents(cfg, tok)
    assert [tok.decode(d) for d in docs["lines"]] == texts == [tok.decode(d) for d in docs["table"]]


def test_save_to_disk_directory_is_a_source(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))})
    ds.save_to_disk(str(tmp_path / "web"))
    cfg = DataConfig(paths=[str(tmp_path / "web")], text_field="body", cache_dir=str(tmp_path / "cache"))
    assert [tok.decode(d) for d in load_documents(cfg, tok)["web"]] == TEXTS
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "both"))
    with pytest.raises(UserError, match=r"DatasetDict \(splits: train, test\); give one split's directory"):
        load_documents(DataConfig(paths=[str(tmp_path / "both")], cache_dir=cfg.cache_dir), tok)
    cfg.paths = [str(tmp_path / "both" / "train")]
    assert [tok.decode(d) for d in load_documents(cfg, tok)["train"]] == TEXTS
    with pytest.raises(UserError, match="has no column 'text' \\(it has body, n\\)"):
        load_documents(DataConfig(paths=cfg.paths, cache_dir=cfg.cache_dir), tok)


class FakeHub:
    """The Hub, without the network: a dataset streamed in shards from memory, at a given commit."""

    def __init__(self, monkeypatch, texts, commit="c0ffee"):
        import datasets

        self.calls = 0
        self.stream = datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset(num_shards=3)
        monkeypatch.setattr(token_store, "_hub_commit", lambda name: commit)
        monkeypatch.setattr(token_store, "_hub_stream", self.open)

    def open(self, name, config, split, revision):
        assert (name, config, split, revision) == ("someone/stories", None, "train", "c0ffee")
        self.calls += 1
        return self.stream


def test_hub_dataset_is_streamed_once_then_read_offline(tok, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    texts = [pin_text(i, 5 + i) for i in range(10)]
    hub = FakeHub(monkeypatch, texts)
    cfg = DataConfig(paths=["hf:someone/stories"], num_proc=1, cache_dir=str(tmp_path / "cache"))
    assert [tok.decode(d) for d in load_documents(cfg, tok)["stories"]] == texts  # shards in order
    assert hub.calls == 4  # its shards counted, then each of the 3 read
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(token_store, "_hub_commit", lambda name: pytest.fail("asked the Hub while offline"))
    monkeypatch.setattr(token_store, "_hub_stream", lambda *args: pytest.fail("streamed while offline"))
    assert [tok.decode(d) for d in load_documents(cfg, tok)["stories"]] == texts  # from the token store
    cfg.cache_dir = str(tmp_path / "empty")
    with pytest.raises(UserError, match="must be streamed from the Hugging Face Hub once, and this machine is "
                                        "offline; connect it"):
        load_documents(cfg, tok)
    with pytest.raises(UserError, match="is not a Hub dataset"):
        load_documents(DataConfig(paths=["hf:a:b:c:d"]), tok)


def test_bad_input_is_one_sentence_and_leaves_no_half_written_store(tok, tmp_path):
    root = write_corpus(tmp_path / "corpus")
    (root / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me".encode("latin-1"))
    (root / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "ol\xe9"}\n')
    (root / "nothing.jsonl").write_text("\n\n")
    cache = tmp_path / "cache"
    bad = {r"latin1.txt is not valid UTF-8 at byte 3; convert it to UTF-8": "latin1.txt",
           r"bad.jsonl is not valid UTF-8 at byte 29;": "bad.jsonl",  # the offset in the file
           r"nothing.jsonl holds no text; add documents to it or remove it from DataConfig.paths": "nothing.jsonl"}
    for message, name in bad.items():
        with pytest.raises(UserError, match=message):
            load_documents(DataConfig(paths=[str(root / "books"), str(root / name)], cache_dir=str(cache)), tok)
        assert not list(cache.rglob("*.tmp"))
    assert len(list(cache.glob("*/meta.json"))) == 2  # books, and the (empty) store of nothing.jsonl


RSS_SCRIPT = """
import json, sys, numpy as np
from training.data import PackedStream
from training.token_store import split_documents
docs = split_documents(sys.argv[1], "train", 0.0)
stream = PackedStream({"synthetic": docs}, 32768, seed=0, upsample_long=5, long_doc_tokens=8192, suffix=[0])
for _ in range(60):
    stream.next_batch(1)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({**{k: int(status[k].split()[0]) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")},
                  "datasets": "datasets" in sys.modules}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_resident_memory_stays_flat_as_the_corpus_grows(tmp_path):
    """Streaming 60 windows of 32K from a 100M-token corpus takes no more memory than from a 10M-token one (the old
    loader held every token in memory: 360 MB more). And reading a corpus does not import `datasets`."""
    rng = np.random.default_rng(0)
    stores = {}
    for n_tokens in (10_000_000, 100_000_000):
        lengths = np.diff([0, *np.unique(rng.integers(1, n_tokens, n_tokens // 20_000)), n_tokens])  # 20K on average
        chunks = ((rng.integers(10, 50_000, n, dtype=np.uint16), [n], [k]) for k, n in enumerate(lengths))
        token_store.write_store(tmp_path / str(n_tokens), chunks, np.uint16, {})
        stores[n_tokens] = tmp_path / str(n_tokens)
    runs = [subprocess.Popen([sys.executable, "-c", RSS_SCRIPT, str(store)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True) for store in stores.values()]
    small, large = (json.loads(run.communicate(timeout=120)[0]) for run in runs)
    assert large["VmHWM"] - small["VmHWM"] < 16_000 and large["RssAnon"] - small["RssAnon"] < 16_000  # kB
    assert large["RssFile"] - small["RssFile"] < 8_000  # the windows are read, not left mapped
    assert not small["datasets"]  # imported only for save_to_disk and Hub sources (generate.py never imports data)
