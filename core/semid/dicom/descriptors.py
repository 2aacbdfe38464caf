"""Clean Descriptors, UPDP-style: remove what identifies from free text, keep the medicine.

Free text (descriptions, comments, history, reason for study, protocol names) is not blanked
wholesale: identifying tokens go, the rest stays. What identifies (the blacklist):

- the values of this header's identifying attributes (patient and staff names, IDs, accession
  number, institution), matched as whole words, case- and accent-insensitively;
- patterns: dates, times, e-mail addresses, phone numbers, long digit runs, ID-like codes, post
  codes, URLs (``data/identifying_terms.json``);
- institution names (runs of capitalised words next to "hospital", "clinic", ...), street
  addresses, and title-case words that are not medical terms (likely proper names) and not common
  words.

Medical terms on the whitelist (``data/pathology_terms.txt``) are always kept unless they are one of
the header's identifiers.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)

# Common words that may start a sentence in title case and identify nobody.
_COMMON = frozenset("""
a an and are as at be by for from has have he her his if in is it its no not of on or patient
patients she study the their there this to was were with without history clinical indication
reason exam examination request requested please compare comparison prior previous new old known
query question findings impression report see also
""".split())


def _fold(text: str) -> str:
    """Lower case without accents, for matching."""
    norm = unicodedata.normalize("NFKD", text)
    return "".join(c for c in norm if not unicodedata.combining(c)).lower()


@lru_cache(maxsize=1)
def _lists() -> tuple[frozenset[str], dict, list[re.Pattern]]:
    data = resources.files("semid") / "data"
    white = frozenset(
        _fold(line.strip()) for line in (data / "pathology_terms.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    black = json.loads((data / "identifying_terms.json").read_text())
    patterns = [re.compile(p) for p in black["patterns"].values()]
    return white, black, patterns


@dataclass
class CleanResult:
    """A cleaned text and how many identifying pieces were removed (never the pieces themselves)."""

    text: str
    removed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def identifier_tokens(values: Iterable[str]) -> frozenset[str]:
    """Folded word tokens of header identifier values (names split on ^ and spaces, IDs whole)."""
    tokens: set[str] = set()
    for value in values:
        if not value:
            continue
        text = str(value)
        folded = _fold(text).strip()
        if len(folded) >= 2:
            tokens.add(folded)
        for word in _TOKEN.findall(text):
            word = _fold(word)
            if len(word) >= 2:
                tokens.add(word)
    return frozenset(tokens)


def clean_text(text: str, identifiers: frozenset[str] = frozenset()) -> CleanResult:
    """Remove identifying tokens from ``text``; keep whitelisted medical terms and ordinary words.

    Args:
        text: a free-text value.
        identifiers: ``identifier_tokens`` of this header (names, IDs, accession, institution).
    """
    white, black, patterns = _lists()
    reasons: dict[str, int] = {}

    def count(reason: str) -> None:
        reasons[reason] = reasons.get(reason, 0) + 1

    # Whole identifier values (IDs, accession numbers, multi-word institution names) go first, before
    # the patterns can cut them into pieces that no longer match.
    for ident in sorted(identifiers, key=len, reverse=True):
        pattern = re.compile(r"(?i)\b" + r"\s+".join(map(re.escape, ident.split())) + r"\b")
        text, n = pattern.subn(" ", text)
        if n:
            reasons["header_value"] = reasons.get("header_value", 0) + n
    for pattern in patterns:
        text, n = pattern.subn(" ", text)
        if n:
            reasons["pattern"] = reasons.get("pattern", 0) + n

    institution = {_fold(w) for w in black["institution_words"]}
    streets = {_fold(w) for w in black["street_words"]}
    titles = {_fold(w).rstrip(".") for w in black["name_titles"]}
    labels = {_fold(w) for w in black["label_words"]}

    pieces = re.split(r"([^\W_]+(?:['’][^\W_]+)*)", text)
    words = pieces[1::2]
    drop = [False] * len(words)
    folded = [_fold(w) for w in words]
    for i, (word, low) in enumerate(zip(words, folded, strict=True)):
        if low in identifiers:
            drop[i] = True
            count("header_value")
        elif low in titles and i + 1 < len(words):
            drop[i] = drop[i + 1] = True  # "Dr Smith": the title and the name after it
            count("name_after_title")
        elif low in institution and low not in white:
            # the capitalised run around an institution word is its name ("St Olav Hospital")
            j = i
            while j > 0 and words[j - 1][:1].isupper() and folded[j - 1] not in white:
                j -= 1
            for k in range(j, i + 1):
                drop[k] = True
            count("institution")
        elif low in streets and i > 0 and (folded[i - 1].isdigit() or words[i - 1][:1].isupper()):
            drop[i] = drop[i - 1] = True
            if i + 1 < len(words) and any(c.isdigit() for c in words[i + 1]):
                drop[i + 1] = True  # the house number after the street name
            count("address")
        elif low in white or low in _COMMON:
            continue
        elif low in labels:
            continue  # a label alone identifies nobody; its value is caught by the rules above
        elif word.isalpha() and word[:1].isupper() and word[1:].islower() and len(word) >= 3:
            drop[i] = True  # a title-case word that is neither medical nor common: likely a name
            count("proper_name")
    out = []
    for i, piece in enumerate(pieces):
        if i % 2 == 1:
            out.append("" if drop[i // 2] else piece)
        else:
            out.append(piece)
    cleaned = re.sub(r"\s{2,}", " ", "".join(out)).strip(" ,;:-/")
    return CleanResult(cleaned, sum(reasons.values()), reasons)
