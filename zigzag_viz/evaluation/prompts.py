"""Prompts generated offline and deterministically: passkey retrieval in varied filler prose (METHOD §8)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib import resources

from ..errors import InputError

FILLER_SENTENCES = (
    "The river bends twice before it reaches the old mill at the edge of the village.",
    "Most bakers agree that bread rises best in a warm kitchen with the windows closed.",
    "A lighthouse keeper once wrote that fog has a sound of its own, soft and heavy.",
    "The committee met on Tuesday to discuss the budget for the new public library.",
    "Copper turns green over the years because it slowly reacts with the air and rain.",
    "In the spring the orchard fills with bees moving from blossom to blossom all day.",
    "Several hikers reported that the northern trail was closed after the heavy storm.",
    "The museum's newest exhibit shows maps drawn by sailors more than three centuries ago.",
    "Children in the town learn to skate on the frozen pond behind the school each winter.",
    "Good coffee depends as much on the grind of the beans as on the water temperature.",
    "The train to the coast leaves at dawn and passes through four small valleys.",
    "An old proverb says that a patient fisherman always goes home with supper.",
    "The architect designed the bridge to sway slightly so that strong winds would not break it.",
    "Farmers in the region rotate their crops to keep the soil rich from year to year.",
    "At the market, the spice seller arranges his jars by colour rather than by name.",
    "Owls can turn their heads much further than people can, which helps them hunt at night.",
    "The choir practised the same difficult passage until every voice found its place.",
    "Rain had fallen for three days, and the streets shone under the yellow lamps.",
    "A good map leaves out almost everything, keeping only what a traveller needs.",
    "The chess club's oldest member still walks to every meeting, whatever the weather.",
    "Glass is made by melting sand at a very high temperature and cooling it quickly.",
    "The garden's tallest sunflower leaned toward the south wall every afternoon.",
    "Historians still argue about why the ancient harbour was abandoned so suddenly.",
    "She kept a notebook of every bird she saw, with the date, the place and the weather.",
    "The bakery on the corner sells out of rye loaves before nine in the morning.",
    "Mountain goats climb cliffs that look impossible, finding holds no wider than a coin.",
    "The mayor promised to repair the clock tower before the summer festival.",
    "Tea was once so valuable that it was kept in locked wooden chests.",
    "The violin maker chose spruce for the top and maple for the back and sides.",
    "Snow fell quietly over the valley, covering the fences and the sleeping fields.",
    "A ferry crosses the lake every hour, carrying cyclists, tourists and the morning post.",
    "The scientist repeated the experiment nine times before she trusted the result.",
    "Old stone walls divide the hills into a patchwork of small green fields.",
    "The library's reading room is silent except for the turning of pages.",
    "Wolves travel in family groups and can cover long distances in a single night.",
    "The potter shaped a dozen bowls before lunch and left them to dry in the sun.",
    "Street musicians gathered in the square as soon as the evening grew cool.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "A comet is visible this month just after sunset, low in the western sky.",
    "The carpenter measured twice and cut once, as his teacher had told him.",
)


@dataclass(frozen=True)
class GeneratedPrompt:
    """A prompt whose correct answer is known."""

    text: str
    answer: str
    needle_depth: float


def filler(rng: random.Random, n_sentences: int) -> list[str]:
    """Varied prose: sentences drawn without immediate repeats, grouped into paragraphs by the caller."""
    sentences = []
    while len(sentences) < n_sentences:
        batch = list(FILLER_SENTENCES)
        rng.shuffle(batch)
        sentences.extend(batch)
    return sentences[:n_sentences]


def paragraphs(sentences: list[str], per_paragraph: int = 6) -> str:
    """Sentences grouped `per_paragraph` to a paragraph, paragraphs separated by blank lines."""
    return "\n\n".join(" ".join(sentences[i : i + per_paragraph]) for i in range(0, len(sentences), per_paragraph))


def passkey_prompt(n_sentences: int = 60, depth: float = 0.5, seed: int = 0, passkey: str | None = None) -> GeneratedPrompt:
    """Passkey retrieval: a 5-digit key hidden at relative `depth` (0 = start, 1 = end) of the filler prose.

    About 18 tokens per filler sentence with the SmolLM2 tokenizer, so 60 sentences ≈ 1.1K tokens.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = passkey or str(rng.randint(10000, 99999))
    sentences = filler(rng, n_sentences)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    sentences.insert(round(depth * len(sentences)), needle)
    text = (
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
        + paragraphs(sentences)
        + "\n\nWhat is the pass key? Answer with the number only."
    )
    return GeneratedPrompt(text=text, answer=key, needle_depth=depth)


def needle_prompt(n_sentences: int = 50, depth: float = 0.6, seed: int = 3) -> GeneratedPrompt:
    """Needle in a haystack: one fact with a one-word answer hidden at relative `depth` of the filler prose."""
    rng = random.Random(seed)
    sentences = filler(rng, n_sentences)
    sentences.insert(round(depth * len(sentences)), "The name of the lighthouse keeper's cat is Pepper.")
    text = paragraphs(sentences) + "\n\nWhat is the name of the lighthouse keeper's cat? Answer with the name only."
    return GeneratedPrompt(text=text, answer="Pepper", needle_depth=depth)


def document_prompt() -> GeneratedPrompt:
    """A question over a bundled article (about 900 tokens); the answer appears once, a third of the way in."""
    article = resources.files("zigzag_viz.evaluation").joinpath("texts/tide_mill.txt").read_text(encoding="utf-8").strip()
    text = article + "\n\nAccording to the article, who designed the tide mill at Kestrel Bay? Answer with the name only."
    return GeneratedPrompt(text=text, answer="Marta Lindqvist", needle_depth=article.find("Marta Lindqvist") / len(article))


def example_prompt() -> GeneratedPrompt:
    """The bundled example shown in the app: a passkey hidden a third of the way into ~1K tokens of prose."""
    return passkey_prompt(n_sentences=55, depth=0.35, seed=7)


EXAMPLES = {
    "passkey in varied prose": example_prompt,
    "needle (a name) in prose": needle_prompt,
    "question over a bundled article": document_prompt,
}

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def split_question(prompt: str, question: str | None = None) -> tuple[str, str, str]:
    """(context, question, full text) of a prompt. With `question` given, the full text is the prompt, a blank
    line and the question; otherwise the question is the prompt's last paragraph (after its last blank line)."""
    if question is not None and question.strip():
        context = prompt.rstrip()
        if not context.strip():
            raise InputError("the context is empty: give some text before the question")
        return context, question.strip(), f"{context}\n\n{question.strip()}"
    parts = _BLANK_LINE.split(prompt.strip())
    if len(parts) < 2 or not parts[-1].strip():
        raise InputError(
            "context mode needs a question: end the prompt with a paragraph after a blank line, or give the question"
        )
    context = prompt.strip()[: prompt.strip().rfind(parts[-1])].rstrip()
    return context, parts[-1].strip(), prompt
