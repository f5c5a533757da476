"""Captions for Fashion-MNIST written from class labels, with many templates and synonyms.

With only ten fixed strings a text-conditioned model could memorise them as ten tokens; varying the
wording (templates x synonyms, about a hundred captions per class) makes it read the text.
`classes_named_in` goes the other way (caption -> classes) for evaluating text-to-image fidelity.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Noun:
    """A name for a class: `bare` for templates like "{n}, product shot", `indefinite` for "a photo of {a}"."""

    bare: str
    indefinite: str


def _one(bare: str) -> Noun:
    article = "an" if bare[0] in "aeiou" else "a"
    return Noun(bare, f"{article} {bare}")


def _pair(plural: str) -> Noun:
    return Noun(plural, f"a pair of {plural}")


# Index = Fashion-MNIST label; the first name is the canonical one. No name may contain another class's
# name as a whole word (longest names are matched first, so "t-shirt" does not also read as "shirt").
CLASS_SYNONYMS: tuple[tuple[Noun, ...], ...] = (
    (_one("t-shirt"), _one("tee"), _one("tank top"), _one("short-sleeved top"), _one("tee shirt"),
     _one("crew-neck tee")),
    (_pair("trousers"), _pair("pants"), _pair("jeans"), _pair("slacks"), _pair("chinos"), _pair("sweatpants")),
    (_one("pullover"), _one("sweater"), _one("jumper"), _one("sweatshirt"), _one("hoodie"), _one("cardigan")),
    (_one("dress"), _one("gown"), _one("sundress"), _one("frock"), _one("shift dress"), _one("evening gown")),
    (_one("coat"), _one("jacket"), _one("overcoat"), _one("parka"), _one("raincoat"), _one("winter coat")),
    (_pair("sandals"), _one("sandal"), _pair("flip-flops"), _one("strappy sandal"), _pair("slides"),
     _one("open-toe sandal")),
    (_one("shirt"), _one("blouse"), _one("button-up shirt"), _one("collared shirt"), _one("flannel shirt"),
     _one("long-sleeved shirt")),
    (_one("sneaker"), _pair("sneakers"), _pair("trainers"), _one("running shoe"), _one("tennis shoe"),
     _one("athletic shoe")),
    (_one("bag"), _one("handbag"), _one("purse"), _one("tote bag"), _one("shoulder bag"), _one("satchel")),
    (_one("ankle boot"), _one("boot"), _pair("ankle boots"), _one("chelsea boot"), _one("bootie"),
     _one("short leather boot")),
)

# "{a}" is the indefinite form ("a sneaker", "a pair of trainers"), "{n}" the bare one. Template words must
# never name a class (checked in the tests).
TEMPLATES: tuple[str, ...] = (
    "a photo of {a}",
    "{n}, product shot",
    "{a} on a plain background",
    "a grayscale photo of {a}",
    "a black and white picture of {a}",
    "{a}",
    "{n}",
    "a catalog image of {a}",
    "a small low-resolution image of {a}",
    "an online store thumbnail of {a}",
    "a centered picture of {a}, dark background",
    "a studio shot of {a}",
    "flat lay of {a}",
    "{n} (fashion product)",
    "an image showing {a}",
    "a simple monochrome photo of {a}",
)

_WORD_RUN = re.compile(r"\s+")


def caption_for_label(label: int, rng: random.Random | None = None) -> str:
    """A caption naming Fashion-MNIST class `label`; deterministic given `rng` (fresh randomness if None)."""
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(CLASS_SYNONYMS):
        raise ValueError(f"label must be an int in [0, {len(CLASS_SYNONYMS) - 1}], got {label!r}")
    rng = rng if rng is not None else random.Random()
    noun = rng.choice(CLASS_SYNONYMS[label])
    template = rng.choice(TEMPLATES)
    return template.format(a=noun.indefinite, n=noun.bare)


def all_captions_for_label(label: int) -> list[str]:
    """Every distinct caption `caption_for_label` can produce for `label`, sorted."""
    if not 0 <= label < len(CLASS_SYNONYMS):
        raise ValueError(f"label must be in [0, {len(CLASS_SYNONYMS) - 1}], got {label!r}")
    return sorted(
        {t.format(a=noun.indefinite, n=noun.bare) for t in TEMPLATES for noun in CLASS_SYNONYMS[label]}
    )


def _build_matchers() -> list[tuple[re.Pattern[str], int]]:
    names = {(noun.bare, label) for label, nouns in enumerate(CLASS_SYNONYMS) for noun in nouns}
    # Singular forms too, so that "a sneaker" and "two sneakers" both match.
    names |= {(name[:-1], label) for name, label in names if name.endswith("s") and not name.endswith("ss")}
    ordered = sorted(names, key=lambda item: -len(item[0]))  # longest first: "t-shirt" before "shirt"
    matchers = []
    for name, label in ordered:
        words = r"[\s_]+".join(re.escape(part) for part in name.split())
        # Whole words only, optional plural; "-" counts as part of a word ("t-shirt" is not "shirt").
        matchers.append((re.compile(rf"(?<![\w-]){words}(?:s|es)?(?![\w-])"), label))
    return matchers


_MATCHERS = _build_matchers()


def classes_named_in(caption: str) -> set[int]:
    """The Fashion-MNIST labels whose names (any synonym, singular or plural) appear in `caption`.

    Matching is case-insensitive and by whole words; a longer name consumes its words, so
    "a t-shirt" gives {0} (not also 6, "shirt") and "an ankle boot" gives {9}.
    """
    text = _WORD_RUN.sub(" ", caption.lower())
    found: set[int] = set()
    for pattern, label in _MATCHERS:
        if pattern.search(text):
            found.add(label)
            text = pattern.sub(" | ", text)  # consume, so shorter names inside it do not match again
    return found


def caption_names_class(caption: str, label: int) -> bool:
    """True when `caption` names class `label` and no other Fashion-MNIST class."""
    return classes_named_in(caption) == {label}
