"""BABILong qa1-qa5 (booydar/babilong: babilong/prompts.py, babilong/metrics.py, babilong/babilong_utils.py,
data/create_tasks.py): simulated bAbI facts hidden in public-domain novels, generated offline on
base.py's pieces."""
from __future__ import annotations

import random
from collections.abc import Callable

from errors import UserError
from evaluation.base import Task, question_at, sentences
from evaluation.texts import books


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
                return prompt, [answer], {"question": question, "facts": facts,
                                          "question_at": question_at(prompt, BABILONG_TEMPLATE, question=question)}
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


TASKS = [Babilong(qa, story) for qa, story in enumerate([qa1, qa2, qa3, qa4, qa5], 1)]
