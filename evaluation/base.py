"""What every evaluation task is built on: `Task` (a prompt that fits a length, and a score), `Sample`, and the text
pieces the tasks share (the noise line, sentences, repeating text, and fitting a prompt to a token budget by search).
The tasks themselves are in tasks.py (passkey, niah and the registry), ruler.py and babilong.py."""
from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from errors import UserError


@dataclass
class Sample:
    prompt: str          # the full text to feed the model
    answers: list[str]   # reference strings
    max_new_tokens: int  # the task's answer budget
    meta: dict = field(default_factory=dict)  # JSON-serialisable details: length, depth, question_at (the character
    #                                           where the question after the context starts), ...


NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b(?:Mr|Ms|Dr|St)\.)(?<!\bMrs\.)\s+|(?<=[.!?][\"')\]”’])\s+")  # for Punkt


def sentences(text: str) -> list[str]:
    return [s for s in SENTENCE_END.split(text) if s]


def repeat(text: str, n_chars: int, sep: str = " ") -> str:
    """`text` repeated (joined by `sep`) and cut to exactly `n_chars` characters."""
    return sep.join([text] * (n_chars // (len(text) + len(sep)) + 1))[:n_chars]


def question_at(prompt: str, template: str, **fields) -> int:
    """Where the question starts in `prompt`, made from `template`: the end of its {context}. What comes after is the
    template's rest formatted with `fields`; eval.py's --compress-before-question keeps it from the KV policy until
    the context is compressed."""
    question = template.split("{context}", 1)[1].format(**fields)
    if not prompt.endswith(question):
        raise ValueError(f"the prompt does not end with its template's question {question[:60]!r}")
    return len(prompt) - len(question)


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
