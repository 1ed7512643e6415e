"""loading/tokenizer.py against transformers, on the default checkpoint (SmolLM2-135M-Instruct's GGUF)."""
import base64
import json
import shutil

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from loading import tokenizer
from loading.gguf_file import GGUFFile
from errors import UserError
from loading.tokenizer import StreamDecoder

# Bytes with no token of their own in SmolLM2's vocabulary: six ASCII controls, the lead bytes 0xF1 and 0xF2
# (code points U+40000-U+BFFFF), and bytes that never occur in UTF-8. tiktoken panics on them; HF drops them.
MISSING = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. It wasn't me, they'll say; we've heard it all before!",
    "code": 'def mean(xs):\n    """Average."""\n    if not xs:\n        return 0.0\n\treturn sum(xs) / len(xs)  # ok\n',
    "numbers": "31415926535897932384626433 and 3.14159, -0.5, 1e-10, 1,234,567, $19.99, 2024-01-31 12:00",
    "digits after whitespace": "x  1\n  42\t\t7 \n\n 8   9",
    "other digits": "½ ² ٣ ४ ① Ⅻ",
    "accents": "Crème brûlée à la française, naïve café, Ångström, Straße, øre",
    "cjk and more": "我爱自然语言处理。東京は日本の首都です。한국어 텍스트 Русский текст العربية हिन्दी",
    "emoji": "👍🏽 family: 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 party 🎉🎉",
    "whitespace": "  leading\ttabs\t\there   trailing   \n\n\n  \t \r\nend  ",
    "special tokens": "<|im_start|>user\nHi<|im_end|>\n<|endoftext|><file_sep>x<reponame><|im_end|><|im_end|> <|im_",
    "empty": "",
}
FRAGMENTS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "  ", "\n\n", "\t", " 12", "'s", "'ll", "é", "🎉", "世界"]
MESSAGES = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Count:  1 2 3"}],
]
text = st.lists(st.one_of(st.text(st.characters(exclude_categories=["Cs", "Cn"]), max_size=15),
                          st.sampled_from(FRAGMENTS)), max_size=10).map("".join)
quick = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_dirs(smollm2_gguf, tmp_path_factory):
    """transformers' tokenizer for the GGUF, saved as an HF directory twice: "plain", as transformers builds it, and
    "smollm2", with SmolLM2's own pre-tokenizer put back (each digit split off, then GPT-2's byte-level regex).
    transformers does not know tokenizer.ggml.pre "smollm" and falls back to the GPT-2 regex alone, which differs
    from the checkpoint's tokenizer (and llama.cpp) on whitespace before a digit: "x  1" is x,Ġ,Ġ,1, not x,ĠĠ,1."""
    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    hf.save_pretrained(plain := tmp_path_factory.mktemp("plain"))
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.save_pretrained(smollm2 := tmp_path_factory.mktemp("smollm2"))
    return {"plain": plain, "smollm2": smollm2}


@pytest.fixture(scope="module")
def ref(hf_dirs):
    return AutoTokenizer.from_pretrained(hf_dirs["smollm2"])


@pytest.mark.parametrize("name", TEXTS)
def test_matches_transformers(tok, ref, name):
    assert tok.encode(TEXTS[name]) == ref(TEXTS[name]).input_ids


@quick
@given(s=text)
def test_matches_transformers_on_random_text(tok, ref, s):
    assert tok.encode(s) == ref(s).input_ids


def test_digits_are_split_one_by_one(tok):
    x, space2, one, two = (tok.encode(s) for s in ("x", "  ", "1", "2"))
    assert tok.encode("x  12") == x + space2 + one + two


@pytest.mark.parametrize("messages", MESSAGES)
def test_chat_template_matches_transformers(tok, ref, messages):
    prompt = tok.apply_chat_template(messages)
    assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert tok.encode(prompt) == ids


def test_special_ids_and_settings(tok, ref):
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.n_vocab) == (ref.bos_token_id, ref.eos_token_id, False, 49152)
    assert tok.stop_ids == {ref.convert_tokens_to_ids("<|im_end|>"), ref.convert_tokens_to_ids("<|endoftext|>")}
    assert tok.encode("hi", add_bos=True) == [tok.bos_id] + tok.encode("hi")


@pytest.mark.parametrize("byte", sorted(b for b in MISSING if b < 0x80))
def test_missing_control_bytes_are_dropped_like_transformers(tok, ref, byte):
    c = chr(byte)
    for s in (c, f"a{c}b", f",{c},", f"..{c}..", f"  {c}  x", f"{c}<|im_end|>{c}{c}"):
        assert tok.encode(s) == ref(s).input_ids
    assert tok.encode(f",{c},") == tok.encode(",,")  # the merge reaches across the dropped byte


@pytest.mark.parametrize("char", ["\U00040000", "\U0005abcd", "\U00080000", "\U000bffff"])
def test_missing_lead_bytes_are_dropped_like_transformers(tok, ref, char):
    for s in (char, f"x{char}y {char}{char}", f"<|im_start|>{char}"):
        assert tok.encode(s) == ref(s).input_ids
    assert tok.decode(tok.encode(char)) == "\ufffd" * 3  # the three continuation bytes are kept, as in HF


@quick
@given(s=text)
def test_round_trip(tok, s):
    if not MISSING & set(s.encode()):
        assert tok.decode(tok.encode(s)) == s


def test_from_hf_matches_from_gguf(tok, hf_dirs):
    hf = tokenizer.from_hf(hf_dirs["smollm2"])
    for s in TEXTS.values():
        assert hf.encode(s) == tok.encode(s)
    assert (hf.bos_id, hf.eos_id, hf.stop_ids, hf.add_bos, hf.n_vocab, hf.chat_template) == \
        (tok.bos_id, tok.eos_id, tok.stop_ids, tok.add_bos, tok.n_vocab, tok.chat_template)


def test_from_hf_gpt2_split_matches_tokenizers(hf_dirs):
    ours, theirs = tokenizer.load(hf_dirs["plain"]), HFTokenizer.from_file(str(hf_dirs["plain"] / "tokenizer.json"))
    for s in TEXTS.values():
        assert ours.encode(s) == theirs.encode(s).ids


@pytest.fixture(scope="module")
def llama3_style(hf_dirs, tmp_path_factory):
    """(ours, transformers') for a Llama-3 style tokenizer.json: a Split regex then ByteLevel without its own regex,
    and a post-processor that prepends BOS (here <|im_start|>)."""
    shutil.copytree(hf_dirs["smollm2"], directory := tmp_path_factory.mktemp("llama3_style"), dirs_exist_ok=True)
    spec = json.loads((directory / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": tokenizer.LLAMA3}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    spec["post_processor"]["single"].insert(0, {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}})
    spec["post_processor"]["special_tokens"] = {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                                 "tokens": ["<|im_start|>"]}}
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    return tokenizer.from_hf(directory), AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("name", TEXTS)
def test_from_hf_split_regex_and_bos_match_transformers(llama3_style, name):
    ours, theirs = llama3_style
    assert ours.add_bos and ours.encode(TEXTS[name])[0] == 1
    assert ours.encode(TEXTS[name]) == theirs(TEXTS[name]).input_ids


@quick
@given(s=text)
def test_from_hf_split_regex_matches_transformers_on_random_text(llama3_style, s):
    ours, theirs = llama3_style
    assert ours.encode(s) == theirs(s).input_ids


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    back = tokenizer.load(tmp_path)
    for s in TEXTS.values():
        assert back.encode(s) == tok.encode(s)
    assert (back.bos_id, back.eos_id, back.stop_ids, back.add_bos, back.n_vocab, back.chat_template) == \
        (tok.bos_id, tok.eos_id, tok.stop_ids, tok.add_bos, tok.n_vocab, tok.chat_template)
    assert back.apply_chat_template(MESSAGES[1]) == tok.apply_chat_template(MESSAGES[1])


def test_stream_decoder_yields_whole_characters(tok):
    s = "héllo 世界 🎉👨‍👩‍👧 naïve — ok 한국어"
    ids = tok.encode(s)
    assert any(not _utf8(tok.decode_bytes([i])) for i in ids)  # some characters really are split across tokens
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == s
    assert "" in pieces and not any("\ufffd" in p for p in pieces)


@quick
@given(ids=st.lists(st.integers(0, 49151), max_size=30))
def test_stream_decoder_equals_decode(tok, ids):
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


def _utf8(data: bytes) -> bool:
    try:
        return bool(data.decode("utf-8"))
    except UnicodeDecodeError:
        return False


def _tiny_gguf(path, model="gpt2", pre="gpt-2"):
    """A GGUF holding only a tokenizer: the 256 bytes, merges Ġ+t and h+e, a control token <s> as BOS."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "<s>"])
    writer.add_token_types([1] * 258 + [3])
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(258)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_add_bos_and_parsed_file(tmp_path):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    for tok in (tokenizer.load(path), tokenizer.from_gguf(GGUFFile(path))):
        assert tok.add_bos and tok.encode(" the") == [258, 256, 257] and tok.encode(" the", add_bos=False) == [256, 257]


def test_llama3_tiktoken_model(tmp_path):
    """Meta's Llama-3 tokenizer.model: tiktoken ranks only (here 256 bytes, "hi" and " hi"); Llama 3.1's special
    tokens follow them."""
    ranks = [bytes([b]) for b in range(256)] + [b"hi", b" hi"]
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks)]
    (tmp_path / "tokenizer.model").write_text("".join(lines))
    tok = tokenizer.load(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.n_vocab, tok.add_bos) == (258, 259, 258 + 256, True)
    assert tok.encode("hi hi<|eot_id|>") == [258, 256, 257, 258 + 9]
    assert tok.stop_ids == {259, 258 + 8, 258 + 9}  # <|end_of_text|>, <|eom_id|>, <|eot_id|>


def test_bad_input_raises_user_error(tmp_path):
    (notes := tmp_path / "notes.txt").write_text("hello")
    (fake := tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    (sentencepiece := tmp_path / "llama2").mkdir()
    (sentencepiece / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x0b")
    (wordpiece := tmp_path / "bert").mkdir()
    (wordpiece / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    (broken := tmp_path / "broken").mkdir()
    (broken / "tokenizer.json").write_text("{ not json")
    (half_saved := tmp_path / "half_saved").mkdir()
    (half_saved / tokenizer.RANKS_FILE).write_text("YQ== 0\n")
    (half_saved / tokenizer.META_FILE).write_text('{"pattern": "."}')
    bad = [tmp_path / "missing", notes, fake, tmp_path, sentencepiece, wordpiece, broken, half_saved,
           _tiny_gguf(tmp_path / "spm.gguf", model="llama"), _tiny_gguf(tmp_path / "odd.gguf", pre="no-such-pre")]
    for path in bad:
        with pytest.raises(UserError) as e:
            tokenizer.load(path)
        assert e.value.args[0].count("; ") == 1, e.value  # one sentence: what is wrong; the fix
