"""The MCPL sentence: which words are learned, and the prompt that feeds them to the text encoder.

Syntax: words to learn are marked in braces, `a photo of a {ball} and a {cactus}`; in mode `diverse`
the marker `<relation>` stands for the per-image relation word (taken from each image's file name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from conceptkit.errors import UserError

WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RELATION_MARK = "<relation>"
# One match per marked word, relation marker or plain word; everything between is kept verbatim.
PIECE = re.compile(r"\{([^{}]*)\}|<relation>|\b[A-Za-z][A-Za-z0-9_]*\b")


@dataclass(frozen=True)
class Sentence:
    text: str
    marked: tuple[str, ...]  # words in braces, first-appearance order, unique
    plain: tuple[str, ...]  # unmarked words, first-appearance order, unique
    has_relation: bool


def parse_sentence(text: str) -> Sentence:
    if not text or not text.strip():
        raise UserError('method.sentence is empty: write the caption with the words to learn in braces, '
                        'e.g. method.sentence="a photo of a {ball} and a {cactus}"')
    marked, plain, relation = [], [], False
    for match in PIECE.finditer(text):
        if match.group(0) == RELATION_MARK:
            relation = True
        elif match.group(1) is not None:
            word = match.group(1)
            if not WORD.match(word):
                raise UserError(f"method.sentence: {{{word}}} is not a word; a placeholder is a letter followed by "
                                f"letters, digits or _ (e.g. {{ball}})")
            if word not in marked:
                marked.append(word)
        elif match.group(0) not in plain:
            plain.append(match.group(0))
    if not marked:
        raise UserError(f'method.sentence {text!r} has no placeholders: mark each word to learn in braces, '
                        f'e.g. "a photo of a {{ball}} and a {{cactus}}"')
    stray = re.sub(r"\{[^{}]*\}", "", text)
    if "{" in stray or "}" in stray:
        raise UserError(f"method.sentence {text!r} has an unmatched brace; mark words as {{word}}")
    return Sentence(text=text, marked=tuple(marked), plain=tuple(w for w in plain if w not in marked),
                    has_relation=relation)


def relation_word(file_name: str) -> str:
    """The relation an image shows, from its file name's leading letters: `on.png`, `under_2.jpg`."""
    match = re.match(r"[A-Za-z]+", file_name)
    if not match:
        raise UserError(f"data.images: {file_name} does not start with a relation word; in method.mode=diverse "
                        f"name each image by its relation (on.png, under.png, next_2.png)")
    return match.group(0).lower()


def render(sentence: Sentence, tokens: dict[str, str], plain_learned: bool, relation: str | None) -> str:
    """The sentence with each marked word replaced by its token, `<relation>` by the relation's
    token, and (mode `all`) each plain word that has a token by that token."""

    def replace(match: re.Match) -> str:
        if match.group(0) == RELATION_MARK:
            return tokens[relation]
        if match.group(1) is not None:
            return tokens[match.group(1)]
        return tokens.get(match.group(0), match.group(0)) if plain_learned else match.group(0)

    return PIECE.sub(replace, sentence.text)
