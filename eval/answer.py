"""Multiple-choice answer extraction: a free-form reply → the option letter it names, or None.

Benchmarks prompt "Answer with the option's letter from the given choices directly.", but small
models reply in many shapes: ``B``, ``(B)``, ``B.``, ``B) a red circle``, ``The answer is B``,
``Answer: B``, ``**B**``, ``b``, or just the option's text. `extract_letter` reads all of these.

A reply that names no option, or names two different ones with equal confidence ("A or B"),
gives ``None`` and is scored WRONG. We never pick a random letter for it (lmms-eval's older
Video-MME scorer did, which adds 25 % × unparseable rate of free accuracy to a weak model).

Order of evidence, strongest first (the first rule that finds a letter wins):

1. the whole reply is one letter, optionally bracketed or punctuated: ``B``, ``(b)``, ``B.``;
2. an answer phrase followed by a letter: ``answer is B``, ``Answer: (B)``, ``option B``;
3. the reply starts with a letter and a delimiter: ``B. …``, ``B) …``, ``(B) …``, ``B: …``;
4. a bracketed letter anywhere, if only one distinct letter is bracketed: ``… is (C) …``;
5. the reply contains the text of exactly one option (longest match wins if one option's text
   contains another's): ``a red circle`` → the option "red circle";
6. the reply starts with a capital letter followed by a space, as in ``B red circle``.

Rule 6 is last because ``A red circle`` is also how people start an English sentence.
Letters outside the given options (``E`` for four options) never count.
"""

from __future__ import annotations

import re

from videollm.data.prompts import LETTERS, format_options  # noqa: F401  (format_options: re-exported)

_MARKUP = re.compile(r"\*\*|__|`|<\/?(?:answer|think)>")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_PHRASE = re.compile(
    r"(?:answer|option|choice)(?:\s+(?:is|would be|should be))?\s*[:：\-]?\s*(?:option\s*)?"
    r"[\(\[]?([A-Ha-h])[\)\]]?(?=$|[\s.,:;!?)\]])",
    re.IGNORECASE,
)
_LEADING = re.compile(r"^[\(\[]?([A-Ha-h])(?:[\)\]]\s*[.:]?|[.:])(?=\s|$)")
_BRACKETED = re.compile(r"[\(\[]([A-Ha-h])[\)\]]")
_WORDS = re.compile(r"[a-z0-9]+")


def _normalise(text: str) -> str:
    """Lowercase words joined by single spaces (punctuation dropped) for text matching."""
    return " ".join(_WORDS.findall(text.lower()))


def _clean(reply: str) -> str:
    text = _THINK.sub(" ", reply)
    text = _MARKUP.sub("", text)
    return text.strip()


def named_option(text: str, options: list[str]) -> int | None:
    """Index of the one option whose text appears in `text` (whole words), else None."""
    reply = f" {_normalise(text)} "
    hits = []
    for i, option in enumerate(options):
        norm = _normalise(option)
        if norm and f" {norm} " in reply:
            hits.append((i, norm))
    if not hits:
        return None
    # "dark red" beats "red" when both match; two unrelated matches are ambiguous.
    longest = max(hits, key=lambda h: len(h[1]))
    if all(norm in longest[1] for _, norm in hits):
        return longest[0]
    return None


def extract_letter(reply: str, options: list[str] | None = None, num_options: int | None = None) -> str | None:
    """The option letter a reply names, or None if it names none (or several).

    options: the option texts without their letters (``["red", "blue", …]``), used for replies
        that give the text instead of the letter, and to bound the valid letters.
    num_options: how many letters are valid when `options` is not given (default 4: A–D).
    """
    n = len(options) if options is not None else (num_options or 4)
    valid = LETTERS[:n]
    text = _clean(reply or "")
    if not text:
        return None

    def ok(letter: str) -> str | None:
        letter = letter.upper()
        return letter if letter in valid else None

    # 1. the whole reply is a letter
    bare = text.strip(" \t\n.:;,!?'\"")
    m = re.fullmatch(r"[\(\[]?([A-Ha-h])[\)\]]?", bare)
    if m:
        return ok(m.group(1))
    # 2. an answer phrase; the last one wins (reasoning replies state the answer at the end).
    #    A lowercase letter counts only when punctuation or the end follows it, so that
    #    "the answer is a red circle" is not read as "A".
    phrased = [m for m in _PHRASE.finditer(text)
               if m.group(1).isupper() or not re.match(r"\s+\w", text[m.end():])]
    if phrased:
        return ok(phrased[-1].group(1))
    # Rules 3 and 6 read a letter at the start; a second capital letter standing alone later
    # ("A or B", "(A) and (C)") makes the reply ambiguous.
    standalone = set(re.findall(r"(?<![A-Za-z])[A-H](?![A-Za-z])", text)) & set(valid)
    # 3. a leading letter with a delimiter
    m = _LEADING.match(text)
    if m:
        return ok(m.group(1)) if len(standalone) <= 1 else None
    # 4. one distinct bracketed letter
    bracketed = {b.upper() for b in _BRACKETED.findall(text)} & set(valid)
    if len(bracketed) == 1:
        return bracketed.pop()
    if len(bracketed) > 1:
        return None
    # 5. the text of exactly one option
    if options:
        index = named_option(text, options)
        if index is not None:
            return valid[index]
    # 6. a capital letter and a space at the start
    m = re.match(r"([A-H])\s", text)
    if m:
        return ok(m.group(1)) if len(standalone) <= 1 else None
    return None


def strip_letter_prefix(option: str) -> str:
    """``"A. red circle"`` → ``"red circle"`` (Video-MME stores options with their letters)."""
    return re.sub(r"^\s*(?:[\(\[][A-H][\)\]]|[A-H][.:)])\s*", "", option, count=1).strip()
