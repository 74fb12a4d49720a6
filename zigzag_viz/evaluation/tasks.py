"""RULER-style tasks generated offline from a seed: passkey, needle in a haystack (single, multi-key, multi-value),
variable tracking, common-words extraction and questions over bundled articles.

Every task comes in several *families*: a filler style × a key format × a wording of the needle and question, so
that no score is a property of one template (`family` is a column of every sweep row). A prompt is sized to a
length in the model's own tokens and holds its needle at a relative depth:

    prompt = TASKS["niah_multikey"].generate(length=2048, depth=0.5, sample=0, family="essay/uuid/formal",
                                             count_tokens=lambda text: len(tokenizer(text).input_ids))
    score(prompt, answer_text)     # 1.0 when every expected string is in the answer (RULER), exact match for QA

The same (task, family, length, depth, sample, seed) gives the same prompt on every machine.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from ..errors import InputError
from .prompts import FILLER_SENTENCES, paragraphs

CountTokens = Callable[[str], int]

ESSAY_SENTENCES = (
    "Every measurement carries an uncertainty, and a careful report states it beside the value.",
    "The committee's minutes record that the motion passed after a long and courteous debate.",
    "Most software defects are found not by tests but by the people who read the code again.",
    "A budget is a forecast dressed as a promise, and both are revised when the facts change.",
    "The survey asked households how far they travel each week for groceries and for work.",
    "Translation is never word for word; the rhythm of a sentence matters as much as its nouns.",
    "Early railway timetables forced towns to agree on a single time for the whole country.",
    "In the archive, letters are filed by the date they arrived rather than the date they were written.",
    "A good index lets a reader find a fact in a thick book within a minute.",
    "The study followed the same two hundred gardens for twelve seasons of planting and harvest.",
    "Economists disagree about how quickly prices respond when the cost of shipping falls.",
    "The lecture explained why bridges are tested with loads far heavier than they will ever carry.",
    "A map projection must distort something: area, angle, distance or direction.",
    "The report recommends shorter meetings with written agendas sent a day in advance.",
    "Bees communicate the direction of flowers through a dance performed inside the hive.",
    "The first printed dictionaries listed words without definitions, only their spellings.",
    "Weather stations on remote islands send their readings by satellite every hour.",
    "The auditors checked a random sample of invoices rather than every single one.",
    "A well-written recipe lists the ingredients in the order in which they are used.",
    "Museums rotate fragile textiles into storage to protect them from light.",
    "The engineers chose a slower but more reliable pump for the village water supply.",
    "Public libraries lend tools, seeds and musical instruments as well as books in some towns.",
    "The census is taken every ten years and counts people where they usually live.",
    "Good handwriting was once taught as carefully as arithmetic in elementary schools.",
    "The observatory closes its dome whenever the humidity rises above a set limit.",
    "Ferry schedules change with the seasons, and the winter timetable has fewer crossings.",
    "A contract is easier to keep when both parties wrote down what they meant.",
    "The old canal now carries more kayaks than cargo, and its locks are worked by volunteers.",
    "Clinical trials compare a new treatment with the best existing one, not with nothing.",
    "The choir's archive holds scores annotated by conductors over more than a century.",
)

FILLERS = {"prose": FILLER_SENTENCES, "essay": ESSAY_SENTENCES}
WORDS = (
    "amber", "basalt", "cedar", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper", "kestrel",
    "lantern", "marble", "nectar", "orchid", "pepper", "quartz", "raven", "saffron", "thistle", "umber", "violet",
    "willow", "yarrow", "zephyr", "anchor", "bramble", "cobalt", "dune", "fennel",
)
NAMES = ("Avery", "Blake", "Casey", "Devon", "Emery", "Finley", "Harper", "Jordan", "Kendall", "Logan", "Morgan",
         "Parker", "Quinn", "Reese", "Rowan", "Sawyer", "Taylor", "Tatum")


def _rng(*parts) -> random.Random:
    """A generator seeded from `parts` the same way on every machine (no Python hash randomisation)."""
    return random.Random(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big"))


KEY_FORMATS = ("digits5", "digits6", "digits7", "word", "uuid")


def make_key(fmt: str, rng: random.Random) -> str:
    """A key in one of the key formats: digits5/6/7, word (two joined words), uuid (8-4-4 hex)."""
    if fmt in KEY_FORMATS and fmt.startswith("digits"):
        size = int(fmt.removeprefix("digits"))
        return str(rng.randint(10 ** (size - 1), 10**size - 1))
    if fmt == "word":
        return "-".join(rng.sample(WORDS, 2))
    if fmt == "uuid":
        hexdigits = "0123456789abcdef"
        return "-".join("".join(rng.choice(hexdigits) for _ in range(size)) for size in (8, 4, 4))
    raise InputError(f"unknown key format {fmt!r:.30}: choose from {', '.join(KEY_FORMATS)}")


@dataclass(frozen=True)
class Family:
    """One template family: filler style, key format and wording ("plain" or "formal")."""

    filler: str
    key_format: str
    wording: str

    @classmethod
    def parse(cls, name: str) -> Family:
        parts = name.split("/")
        if len(parts) != 3 or parts[0] not in FILLERS or parts[2] not in ("plain", "formal"):
            raise InputError(f"unknown prompt family {name!r:.60}: filler/key format/wording, e.g. prose/digits5/plain")
        make_key(parts[1], random.Random(0))
        return cls(*parts)


@dataclass(frozen=True)
class TaskPrompt:
    """A generated prompt: the context (needles in filler), the question asked after it, the strings a right
    answer contains, and where it came from (task, family, length in tokens asked, depth, sample)."""

    task: str
    family: str
    length: int
    depth: float
    sample: int
    context: str
    question: str
    answers: tuple[str, ...]
    exact: bool = False

    @property
    def text(self) -> str:
        return f"{self.context}\n\n{self.question}"


def _normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def score(prompt: TaskPrompt, answer: str) -> float:
    """1.0 or 0.0 for RULER's rule (every expected string in the answer as a whole word, case-insensitive, so a
    key inside a longer number or a word inside another does not count) or, for questions
    over articles, exact match of the answer's first line after SQuAD-style normalisation; partial credit for
    multi-string tasks is the share of expected strings found."""
    if prompt.exact:
        first = next((line for line in answer.strip().splitlines() if line.strip()), "")
        return float(any(_normalise(first) == _normalise(a) for a in prompt.answers))
    found = sum(bool(re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", answer, re.IGNORECASE)) for a in prompt.answers)
    return found / len(prompt.answers)


def _sized(build: Callable[[int], str], length: int, count_tokens: CountTokens, per_sentence: int = 18) -> str:
    """The longest `build(sentences)` whose token count stays within `length` (at least one sentence)."""
    low, high = 1, max(2, 2 * length // per_sentence + 2)
    while count_tokens(build(high)) <= length and high < 200_000:
        high *= 2
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(build(middle)) <= length:
            low = middle
        else:
            high = middle - 1
    return build(low)


def _haystack(family: Family, rng: random.Random, count: int, needles: list[str], depth: float) -> str:
    """`count` filler sentences of the family's style with the needles inserted around relative `depth`."""
    pool = FILLERS[family.filler]
    sentences = []
    while len(sentences) < count:
        batch = list(pool)
        rng.shuffle(batch)
        sentences.extend(batch)
    sentences = sentences[:count]
    position = round(depth * len(sentences))
    for offset, needle in enumerate(needles):
        sentences.insert(min(position + offset * 2, len(sentences)), needle)
    return paragraphs(sentences)


class Task:
    """A task: its name, families and a generator of sized prompts. Subclasses define `parts`."""

    name = ""
    summary = ""
    families: tuple[str, ...] = ()
    has_depth = True  # False: the prompt has no needle, so the depth does not change it

    def parts(self, family: Family, rng: random.Random) -> tuple[str, list[str], str, tuple[str, ...]]:
        """(intro line, needle sentences, question, expected answers) for one sample."""
        raise NotImplementedError

    def generate(self, length: int, depth: float, sample: int, family: str, count_tokens: CountTokens,
                 seed: int = 0) -> TaskPrompt:
        if not 0.0 <= depth <= 1.0:
            raise InputError(f"needle depth must lie in [0, 1], got {depth}")
        chosen = Family.parse(family)
        rng = _rng(self.name, family, sample, seed)
        intro, needles, question, answers = self.parts(chosen, rng)
        fill_seed = rng.random()

        def build(count: int) -> str:
            hay = _haystack(chosen, random.Random(fill_seed), count, needles, depth)
            return f"{intro}\n\n{hay}\n\n{question}"

        text = _sized(build, length, count_tokens)
        context = text[: text.rfind("\n\n")]
        return TaskPrompt(self.name, family, length, depth, sample, context, question, answers)


FAMILIES = ("prose/digits5/plain", "essay/digits7/formal", "prose/word/formal", "essay/uuid/plain")
# A name → value fact and the question for it, per wording (the needle-in-a-haystack tasks share them).
FACT = {"plain": "One of the special magic numbers for {} is: {}.", "formal": "The identifier assigned to {} is {}."}
ASK = {"plain": "What is the special magic number for {}? Answer with the number only.",
       "formal": "Which identifier was assigned to {}? Give the identifier only."}


class Passkey(Task):
    name = "passkey"
    summary = "one key hidden in filler; asked for it"
    families = FAMILIES

    def parts(self, family, rng):
        key = make_key(family.key_format, rng)
        if family.wording == "plain":
            return ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.",
                    [f"The pass key is {key}. Remember it. {key} is the pass key."],
                    "What is the pass key? Answer with the key only.", (key,))
        return ("The following document contains an access code among unrelated material.",
                [f"Record this access code: {key}."],
                "Which access code does the document contain? Reply with the code alone.", (key,))


class NiahSingle(Task):
    name = "niah_single"
    summary = "one key–value fact hidden in filler; asked for the value"
    families = FAMILIES

    def parts(self, family, rng):
        name, value = rng.choice(NAMES), make_key(family.key_format, rng)
        intro = ("Some special magic numbers are hidden in the text below. Memorize them." if family.wording == "plain"
                 else "The record below lists identifiers assigned to several people.")
        return intro, [FACT[family.wording].format(name, value)], ASK[family.wording].format(name), (value,)


class NiahMultikey(Task):
    name = "niah_multikey"
    summary = "four key–value facts hidden in filler; asked for one of them"
    families = FAMILIES

    def parts(self, family, rng):
        names = rng.sample(NAMES, 4)
        values = [make_key(family.key_format, rng) for _ in names]
        asked = rng.randrange(len(names))
        needles = [FACT[family.wording].format(n, v) for n, v in zip(names, values)]
        rng.shuffle(needles)
        question = ASK[family.wording].format(names[asked])
        return "Several special values are hidden in the text below. Memorize them.", needles, question, (values[asked],)


class NiahMultivalue(Task):
    name = "niah_multivalue"
    summary = "three values of one key hidden in filler; asked for all of them"
    families = FAMILIES

    def parts(self, family, rng):
        name = rng.choice(NAMES)
        values = [make_key(family.key_format, rng) for _ in range(3)]
        template = FACT["plain"] if family.wording == "plain" else "Another identifier assigned to {} is {}."
        question = (f"What are all the special magic numbers for {name}? List them." if family.wording == "plain"
                    else f"List every identifier assigned to {name}.")
        return ("Special values are hidden in the text below. Memorize them.", [template.format(name, v) for v in values],
                question, tuple(values))


class VariableTracking(Task):
    name = "vt"
    summary = "a chain of assignments X = Y hidden in filler; asked for every variable holding the value"
    families = FAMILIES

    def parts(self, family, rng):
        value = make_key(family.key_format, rng)
        names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(5)) for _ in range(4)]
        needles = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
        question = (f"Which variables are assigned the value {value}? List all of them." if family.wording == "plain"
                    else f"Give every variable that ends up holding {value}.")
        return "Memorize and track the chain of variable assignments hidden in the text below.", needles, question, tuple(names)


class CommonWords(Task):
    name = "cwe"
    summary = "a list of words, a few repeated often; asked for the most common ones"
    families = FAMILIES
    has_depth = False

    def generate(self, length, depth, sample, family, count_tokens, seed=0):
        chosen = Family.parse(family)
        rng = _rng(self.name, family, sample, seed)
        common = rng.sample(WORDS, 5)
        rare_pool = [w for w in WORDS if w not in common] + [w + "s" for w in WORDS if w not in common]
        question = ("What are the 5 most common words in the list above? Answer with the words only."
                    if chosen.wording == "plain" else "Name the five words that occur most often in the list.")
        fill_seed = rng.random()

        def build(count: int) -> str:
            local = random.Random(fill_seed)
            words = [w for w in common for _ in range(max(count // 8, 3))]
            words += [local.choice(rare_pool) for _ in range(count)]
            local.shuffle(words)
            numbered = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
            return f"Below is a numbered list of words.\n\n{numbered}\n\n{question}"

        text = _sized(build, length, count_tokens, per_sentence=4)
        return TaskPrompt(self.name, family, length, depth, sample, text[: text.rfind("\n\n")], question, tuple(common))


# (question, answer, what the answer is) per bundled article in texts/.
ARTICLE_QUESTIONS = {
    "tide_mill": (("Who designed the tide mill at Kestrel Bay?", "Marta Lindqvist", "name"),
                  ("In which year did the mill begin grinding grain?", "1784", "year"),
                  ("In which year did a storm break through the dam?", "1799", "year"),
                  ("In which year was the last sack of flour ground at the mill?", "1891", "year")),
    "glass_observatory": (("Who designed the observatory building on Harrow Fell?", "Helena Marsh", "name"),
                          ("Who recorded a new star in the constellation of Aquila?", "Clara Oduya", "name"),
                          ("In which year did the observatory open to members?", "1907", "year")),
    "salt_road": (("In which year was the causeway first mentioned in a charter?", "1318", "year"),
                  ("Who was the last toll keeper on the causeway?", "Ingrid Halvorsen", "name"),
                  ("In which year was the canal from Ostmere to the river cut?", "1763", "year")),
}


class ArticleQuestions(Task):
    name = "qa"
    summary = "a question over a bundled article inside filler; exact match of the answer"
    families = ("prose/digits5/plain", "essay/digits5/formal")

    def generate(self, length, depth, sample, family, count_tokens, seed=0):
        chosen = Family.parse(family)
        rng = _rng(self.name, family, sample, seed)
        article_name = sorted(ARTICLE_QUESTIONS)[sample % len(ARTICLE_QUESTIONS)]
        question, answer, kind = rng.choice(ARTICLE_QUESTIONS[article_name])
        article = resources.files("zigzag_viz.evaluation").joinpath(f"texts/{article_name}.txt").read_text(encoding="utf-8").strip()
        asked = (f"According to the article, {question[0].lower()}{question[1:]} Answer with the {kind} only."
                 if chosen.wording == "plain" else f"{question} Reply with the {kind} alone, as written in the article.")
        fill_seed = rng.random()

        def build(count: int) -> str:
            hay = _haystack(chosen, random.Random(fill_seed), count, [f"\n\n{article}\n\n"], depth)
            return f"Read the article hidden in the text below.\n\n{hay}\n\n{asked}"

        if count_tokens(build(0)) > length:
            raise InputError(f"the article {article_name} alone is longer than {length} tokens")
        text = _sized(build, length, count_tokens)
        return TaskPrompt(self.name, family, length, depth, sample, text[: text.rfind("\n\n")], asked, (answer,), exact=True)


TASKS: dict[str, Task] = {task.name: task for task in (
    Passkey(), NiahSingle(), NiahMultikey(), NiahMultivalue(), VariableTracking(), CommonWords(), ArticleQuestions())}


def parse_tasks(text: str) -> list[Task]:
    """Tasks from comma-separated names; InputError naming an unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError(f"no task given: choose from {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise InputError(f"unknown task {unknown[0]!r:.40}: choose from {', '.join(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]

