"""The content policy: categories of restricted terms and patterns, checked on folded text.

A policy file (``CHARFORGE_CONTENT_POLICY``) is TOML::

    [categories.violence]
    description = "Graphic violence"          # optional
    terms = ["gore", "beheading"]             # whole words or phrases
    patterns = ["dismember(ed|ment)?"]        # regular expressions
    enabled = true                            # optional; false keeps the category but skips it

Text is folded before it is matched (``fold``): NFKD then NFKC (fullwidth letters become plain),
case folding, accents and other combining marks dropped, zero-width and other invisible
characters removed, and every run of punctuation, underscores or spaces made one space. Terms
are folded the same way and match whole words only ("ass" does not hit "class"); patterns
run on the folded text, so they see lower-case words joined by single spaces.
"""

from __future__ import annotations

import importlib
import re
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from charforge.errors import RestrictedContent
from charforge.safety.builtin import (
    BUILTIN_CATEGORY,
    BUILTIN_DESCRIPTION,
    BUILTIN_PATTERNS,
    BUILTIN_TERMS,
)

ENV_VAR = "CHARFORGE_CONTENT_POLICY"
MAX_FILE_BYTES = 1024 * 1024
MAX_CATEGORIES = 100
MAX_TERMS = 10_000  # per category
MAX_PATTERNS = 200  # per category
MAX_TERM_CHARS = 200
MAX_PATTERN_CHARS = 1000
# Patterns run on windows of this many characters (overlapping by PATTERN_OVERLAP): a pattern
# that backtracks costs at most the square of a window, however long the text. Every field
# checked today (a composed prompt, a description) fits in one window.
PATTERN_WINDOW, PATTERN_OVERLAP = 10_000, 1_000

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_CATEGORY_KEYS = {"description", "terms", "patterns", "enabled"}
# Invisible characters outside category Cf that render as nothing (Hangul fillers, braille
# blank); variation selectors are combining marks and go with them.
_INVISIBLE = {0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800}
_WORD = re.compile(r"[^\W_]+")
# Scripts written without spaces between words: their terms match anywhere, not by word.
_UNSPACED = re.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file, the key and the problem."""


def fold(text: str) -> str:
    """Text as the policy sees it: see the module docstring."""
    kept = []
    # NFKD: fullwidth and other compatibility forms become plain letters, accents come apart.
    for char in unicodedata.normalize("NFKD", text):
        kind = unicodedata.category(char)
        if kind in ("Cf", "Mn", "Mc", "Me") or ord(char) in _INVISIBLE:
            continue  # zero-width, format and combining characters: never a word boundary
        kept.append(char)
    plain = unicodedata.normalize("NFKC", "".join(kept)).casefold()
    return " ".join(_WORD.findall(plain))


@dataclass
class Category:
    name: str
    description: str = ""
    terms: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    enabled: bool = True
    builtin: bool = False
    _phrases: set[str] = field(default_factory=set, repr=False)
    _unspaced: list[str] = field(default_factory=list, repr=False)
    _compiled: list[re.Pattern[str]] = field(default_factory=list, repr=False)
    _longest: int = field(default=0, repr=False)

    def add(self, terms: Iterable[str], patterns: Iterable[str], where: str) -> None:
        for index, term in enumerate(terms):
            folded = fold(term)
            if not folded:
                raise PolicyError(f"{where}.terms[{index}] ({term!r}) has no letters or digits")
            self.terms.append(term)
            if _UNSPACED.search(folded):
                self._unspaced.append(folded)
            else:
                self._phrases.add(folded)
                self._longest = max(self._longest, folded.count(" ") + 1)
        for index, pattern in enumerate(patterns):
            self._compiled.append(compile_pattern(pattern, f"{where}.patterns[{index}]"))
            self.patterns.append(pattern)

    def hits(self, folded: str) -> bool:
        words = folded.split(" ")
        for size in range(1, self._longest + 1):
            for start in range(len(words) - size + 1):
                if " ".join(words[start : start + size]) in self._phrases:
                    return True
        if any(term in folded for term in self._unspaced):
            return True
        return any(
            pattern.search(window) for window in _windows(folded) for pattern in self._compiled
        )


def _windows(text: str) -> list[str]:
    step = PATTERN_WINDOW - PATTERN_OVERLAP
    return [
        text[i : i + PATTERN_WINDOW] for i in range(0, max(1, len(text) - PATTERN_OVERLAP), step)
    ]


def compile_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """A policy regex, refused when it may run for ages (nested or ambiguous repeats) or
    cannot be matched in linear-ish time (back-references)."""
    if not isinstance(pattern, str) or not pattern:
        raise PolicyError(f"{where} must be a non-empty string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PolicyError(f"{where} is {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}")
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise PolicyError(f"{where} is not a valid regular expression: {exc}") from exc
    parser: Any = importlib.import_module("re._parser")  # the stdlib's own parse tree
    problem = _risky(parser, parser.parse(pattern, re.IGNORECASE), inside_repeat=False)
    if problem:
        raise PolicyError(
            f"{where} ({pattern!r}) {problem}, which can take exponential time on some texts; "
            "rewrite it without that (e.g. 'a+' instead of '(a+)+')"
        )
    return compiled


def _risky(parser: Any, items: Any, *, inside_repeat: bool) -> str | None:
    for op, arg in items:
        if op is parser.GROUPREF or op is parser.GROUPREF_EXISTS:
            return "uses a back-reference"
        if op in (parser.MAX_REPEAT, parser.MIN_REPEAT, parser.POSSESSIVE_REPEAT):
            _low, high, body = arg
            unbounded = high is parser.MAXREPEAT or high > 16
            if unbounded and inside_repeat and op is not parser.POSSESSIVE_REPEAT:
                return "repeats a repeat"
            found = _risky(parser, body, inside_repeat=inside_repeat or unbounded)
            if found:
                return found
        elif op is parser.BRANCH:
            branches = arg[1]
            if inside_repeat and _overlapping(branches):
                return "repeats alternatives that start alike"
            for branch in branches:
                found = _risky(parser, branch, inside_repeat=inside_repeat)
                if found:
                    return found
        elif op is parser.SUBPATTERN:
            found = _risky(parser, arg[-1], inside_repeat=inside_repeat)
            if found:
                return found
        elif op in (parser.ASSERT, parser.ASSERT_NOT):
            found = _risky(parser, arg[1], inside_repeat=inside_repeat)
            if found:
                return found
        elif op is parser.ATOMIC_GROUP:
            continue  # no backtracking into it
    return None


def _overlapping(branches: list[Any]) -> bool:
    firsts = [str(list(branch)[:1]) for branch in branches]
    return len(set(firsts)) < len(firsts) or "[]" in firsts


@dataclass
class ContentPolicy:
    categories: dict[str, Category]
    path: Path | None = None
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def category_hit(self, text: str) -> str | None:
        """The first category the text hits (the built-in one first), or None."""
        folded = fold(text)
        if not folded:
            return None
        for category in self.categories.values():
            if category.enabled and category.hits(folded):
                return category.name
        return None

    def check(self, field: str, text: str | None, *, what: str | None = None) -> None:
        """Raise ``RestrictedContent`` naming ``field`` and the category; the terms are never
        echoed, so the answer cannot be used to read the list."""
        if not text:
            return
        category = self.category_hit(text)
        if category is None:
            return
        raise RestrictedContent(
            f"{what or field} hits the content policy's category '{category}'.",
            field=field,
            hint="Rephrase it without that content; an administrator can explain the policy.",
            extra={"category": category},
        )

    def check_all(self, fields: Mapping[str, str | None]) -> None:
        for name, text in fields.items():
            self.check(name, text)


def builtin_policy() -> ContentPolicy:
    return ContentPolicy({BUILTIN_CATEGORY: _builtin_category()})


def _builtin_category() -> Category:
    category = Category(BUILTIN_CATEGORY, BUILTIN_DESCRIPTION, builtin=True)
    category.add(BUILTIN_TERMS, BUILTIN_PATTERNS, "built-in")
    return category


def load_policy(path: Path | None) -> ContentPolicy:
    """The built-in category, plus the file's categories when a file is named."""
    if path is None:
        return builtin_policy()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyError(f"{path} is {len(raw)} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path} is not UTF-8 text (byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path} is not valid TOML: {exc}") from exc
    return ContentPolicy(_categories_of(data, path), path=path)


def _categories_of(data: dict[str, Any], path: Path) -> dict[str, Category]:
    stray = sorted(set(data) - {"categories"})
    if stray:
        raise PolicyError(
            f"{path}: unknown top-level key(s) {', '.join(stray)}; use [categories.NAME]"
        )
    tables = data.get("categories", {})
    if not isinstance(tables, dict):
        raise PolicyError(f"{path}: 'categories' must be a table of [categories.NAME] tables")
    if len(tables) > MAX_CATEGORIES:
        raise PolicyError(f"{path} has {len(tables)} categories; the limit is {MAX_CATEGORIES}")
    result = {BUILTIN_CATEGORY: _builtin_category()}
    for name, table in tables.items():
        where = f"{path}: categories.{name}"
        if not _NAME.fullmatch(name):
            raise PolicyError(f"{where}: a category name is 1-64 of a-z, 0-9, '_' and '-'")
        if not isinstance(table, dict):
            raise PolicyError(f"{where} must be a table with terms and patterns")
        unknown = sorted(set(table) - _CATEGORY_KEYS)
        if unknown:
            allowed = ", ".join(sorted(_CATEGORY_KEYS))
            raise PolicyError(f"{where}: unknown key(s) {', '.join(unknown)} (it takes {allowed})")
        terms = _strings(table.get("terms", []), f"{where}.terms", MAX_TERMS, MAX_TERM_CHARS)
        patterns = _strings(table.get("patterns", []), f"{where}.patterns", MAX_PATTERNS, None)
        enabled = table.get("enabled", True)
        description = table.get("description", "")
        if not isinstance(enabled, bool) or not isinstance(description, str):
            raise PolicyError(f"{where}: enabled must be true or false, description a string")
        if name == BUILTIN_CATEGORY:
            if not enabled:
                raise PolicyError(
                    f"{where}: the built-in category '{BUILTIN_CATEGORY}' cannot be switched "
                    "off; a file may only add terms and patterns to it"
                )
            result[name].add(terms, patterns, where)
            continue
        category = Category(name, description, enabled=enabled)
        category.add(terms, patterns, where)
        result[name] = category
    return result


def _strings(value: Any, where: str, most: int, longest: int | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise PolicyError(f"{where} must be a list of strings")
    if len(value) > most:
        raise PolicyError(f"{where} has {len(value)} entries; the limit is {most}")
    if longest is not None:
        for index, item in enumerate(value):
            if len(item) > longest:
                raise PolicyError(
                    f"{where}[{index}] is {len(item)} characters; the limit is {longest}"
                )
    return list(value)
