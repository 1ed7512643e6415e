"""SentencePieceTokenizer (Llama 2's kind) against HF `tokenizers` on a small Llama-2-style tokenizer trained here."""
import json

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers

from loading import tokenizer
from loading.tokenizer import SentencePieceTokenizer, StreamDecoder, _merges_from_scores

CORPUS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a "
    "wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood,",
    "Call me Ishmael. Some years ago - never mind how long precisely - having little or no money in my purse, and "
    "nothing particular to interest me on shore, I thought I would sail about a little and see the watery part.",
    "def parse(text):\n    return [int(x) for x in text.split(',')]  # 1234 5678",
]
TEXTS = ["Hello world", "the  two   spaces", " leading and trailing ", "tabs\tand\nnew\n\nlines", "",
         "ünïcödé, 中文 and 🙂", "a" * 40, "1234567890", *CORPUS]


def spec_llama2(merges_from=None) -> dict:
    """tokenizer.json of a Llama-2-style tokenizer: BPE over "▁"-spelled text, byte fallback, <unk> <s> </s>."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)  # training only
    hf.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(hf.to_str())
    spec["pre_tokenizer"] = None  # Llama 2: no split; merges run over the whole text
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    if merges_from is not None:
        spec["model"]["merges"] = merges_from(vocab)
    return spec


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    """(ours from tokenizer.json, HF tokenizers' reference)."""
    directory = tmp_path_factory.mktemp("llama2")
    spec = spec_llama2()
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "add_bos_token": True}))
    return tokenizer.load(directory), HFTokenizer.from_str(json.dumps(spec))


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tokenizers(llama2, text):
    ours, ref = llama2
    assert isinstance(ours, SentencePieceTokenizer)
    assert ours.encode_ordinary(text) == ref.encode(text, add_special_tokens=False).ids
    assert ours.decode(ours.encode_ordinary(text)) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(list("aeinost hrl,.\n😀é中") + ["  ", "the", " of "]), max_size=30).map("".join))
def test_matches_tokenizers_on_random_text(llama2, text):
    ours, ref = llama2
    assert ours.encode_ordinary(text) == ref.encode(text, add_special_tokens=False).ids


def test_whole_text_merging_equals_word_by_word(llama2):
    """The word cache is exact only when no piece spans "x▁"; the whole-text path is the definition."""
    ours, _ = llama2
    assert ours._by_word
    for text in filter(None, TEXTS):
        assert ours._bpe("▁" + text.replace(" ", "▁")) == ours.encode_ordinary(text)


def test_bos_stop_ids_save_and_stream(llama2, tmp_path):
    ours, ref = llama2
    bos, eos = ref.token_to_id("<s>"), ref.token_to_id("</s>")
    assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.stop_ids) == (bos, eos, True, {eos})
    assert ours.encode("Hello") == [bos] + ours.encode_ordinary("Hello")
    ours.save(tmp_path)
    again = tokenizer.load(tmp_path)
    assert isinstance(again, SentencePieceTokenizer) and again.n_vocab == ours.n_vocab
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text)
    ids = ours.encode_ordinary("Hello 🙂 world")  # the emoji is four byte tokens
    stream = StreamDecoder(ours)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == " Hello 🙂 world"


def test_gguf_scores_give_the_same_tokens(llama2, tmp_path):
    """A GGUF of model "llama" holds scores, not merges: SentencePiece joins a pair when their union is a piece, the
    best score first. Scored by a piece's first merge, it tokenises as HF does with the merges that rule implies."""
    ours, _ = llama2
    pieces = ours._pieces
    first = {}
    for r, (a, b) in enumerate(ours._merges):
        first.setdefault(a + b, r)
    special = set(ours._special)
    kinds = [3 if p in special else 6 if p.startswith("<0x") else 1 for p in pieces]
    kinds[pieces.index("<unk>")] = 2
    scores = [-float(first.get(p, 0)) for p in pieces]
    path = tmp_path / "llama2.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.add_bos_token_id(pieces.index("<s>"))
    writer.add_eos_token_id(pieces.index("</s>"))
    writer.add_unk_token_id(pieces.index("<unk>"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from_gguf = tokenizer.load(path)
    implied = _merges_from_scores(pieces, scores, [k == 1 for k in kinds])
    spec = spec_llama2(merges_from=lambda vocab: implied)
    ref = HFTokenizer.from_str(json.dumps(spec))
    assert (from_gguf.bos_id, from_gguf.add_bos) == (pieces.index("<s>"), True)
    for text in TEXTS:
        assert from_gguf.encode_ordinary(text) == ref.encode(text, add_special_tokens=False).ids


def test_corpus_tokenises_and_caches_with_it(llama2, tmp_path):
    """training/data.py with a SentencePiece tokenizer: documents round-trip, and a second read comes from the cache."""
    from training.data import DataConfig, load_documents

    ours, _ = llama2
    (tmp_path / "books").mkdir()
    for i, text in enumerate(CORPUS):
        (tmp_path / "books" / f"{i}.txt").write_text(text)
    cfg = DataConfig(paths=[str(tmp_path / "books")], cache_dir=str(tmp_path / "cache"))
    docs = load_documents(cfg, ours)["books"]
    assert [ours.decode(d.tolist()) for d in docs] == CORPUS
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 1  # one token store for the source
    assert [d.tolist() for d in load_documents(cfg, ours)["books"]] == [d.tolist() for d in docs]
