"""The content policy: folding, whole-word matching, the built-in category, the file format."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from charforge.container import build_container
from charforge.errors import RestrictedContent
from charforge.safety import (
    BUILTIN_CATEGORY,
    ContentPolicy,
    PolicyError,
    PolicyHolder,
    builtin_policy,
    fold,
    load_policy,
)
from charforge.safety import policy as policy_module
from tests.conftest import make_settings

POLICY = """
[categories.weapons]
description = "Stand-in terms for the tests"
terms = ["zorblax", "plasma rifle"]
patterns = ['\\bblood ?bath\\w*']
"""

# The same word written the ways a filter is usually slipped past.
VARIANTS = [
    "zorblax",
    "ZorBLAX",
    "ｚｏｒｂｌａｘ",  # fullwidth
    "zor\u200bblax",  # zero-width space
    "zor\u2060bl\u00adax",  # word joiner, soft hyphen
    "zo\u0308rbla\u0301x",  # combining marks
    "zörblàx",  # precomposed accents
    "z\ufe0forblax",  # a variation selector
]


def _policy(tmp_path: Path, text: str = POLICY) -> ContentPolicy:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    return load_policy(path)


def test_fold_makes_variants_plain() -> None:
    for variant in VARIANTS:
        assert fold(variant) == "zorblax", variant
    assert fold("  Plasma_RIFLE!!  ") == "plasma rifle"
    assert fold("\u3164\u2800") == ""


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_hits(tmp_path: Path, variant: str) -> None:
    policy = _policy(tmp_path)
    assert policy.category_hit(f"a knight holding a {variant}, sunset") == "weapons"


def test_terms_match_whole_words_and_phrases_only(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    assert policy.category_hit("a zorblaxian envoy") is None  # a longer word is another word
    assert policy.category_hit("the plasma, rifle-range") == "weapons"  # punctuation is a space
    assert policy.category_hit("plasmarifle") is None
    assert policy.category_hit("a BloodBaths scene") == "weapons"  # a pattern
    assert builtin_policy().category_hit("a classy lass in class") is None


def test_check_names_field_and_category_and_never_the_term(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    with pytest.raises(RestrictedContent) as caught:
        policy.check("appearance", "tall, ｚｏｒｂｌａｘ")
    error = caught.value
    assert (error.status, error.code, error.field) == (422, "restricted_content", "appearance")
    envelope = error.to_envelope()["error"]
    assert envelope["category"] == "weapons"
    assert "zorblax" not in str(envelope).lower()
    policy.check("prompt", "")  # nothing to check
    policy.check("prompt", None)


def test_builtin_category_is_on_without_a_file() -> None:
    policy = load_policy(None)
    assert list(policy.categories) == [BUILTIN_CATEGORY]
    assert policy.category_hit("ｌｏ\u200bＬＩ") == BUILTIN_CATEGORY
    # A minor and a sexual word anywhere in one text; either alone passes.
    assert policy.category_hit("a child, sitting; she is naked") == BUILTIN_CATEGORY
    assert policy.category_hit("a 12 yo, nude") == BUILTIN_CATEGORY
    assert policy.category_hit("a child reading a book") is None
    assert policy.category_hit("a nude marble statue") is None
    assert policy.category_hit("an 18 years old woman, nude") is None


def test_a_file_adds_to_the_builtin_category_and_cannot_switch_it_off(tmp_path: Path) -> None:
    policy = _policy(tmp_path, POLICY + '[categories.sexual_minors]\nterms = ["qwopp"]\n')
    assert policy.category_hit("qwopp") == BUILTIN_CATEGORY
    assert policy.category_hit("lolicon") == BUILTIN_CATEGORY  # the built-in terms stay
    assert policy.categories[BUILTIN_CATEGORY].builtin
    with pytest.raises(PolicyError, match="cannot be switched off"):
        _policy(tmp_path, "[categories.sexual_minors]\nenabled = false\n")
    # Another category may be off: kept, not matched.
    off = _policy(tmp_path, POLICY.replace('description = "', 'enabled = false\ndescription = "'))
    assert off.category_hit("zorblax") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[categories.weapons\nterms = []", "not valid TOML.*line 1"),
        ('[categories.weapons]\nterms = "gore"', r"categories.weapons.terms must be a list"),
        ('[categories.weapons]\nwords = ["gore"]', "unknown key.*words"),
        ('[category.weapons]\nterms = ["gore"]', "unknown top-level key.*category"),
        ('[categories.weapons]\npatterns = ["(unclosed"]', r"patterns\[0\] is not a valid"),
        ('[categories.weapons]\npatterns = ["(a+)+b"]', "repeats a repeat"),
        ('[categories.weapons]\npatterns = ["(a|ab)*c"]', "alternatives that start alike"),
        ('[categories.weapons]\npatterns = ["(a)\\\\1"]', "back-reference"),
        ('[categories.weapons]\nterms = ["!!!"]', "no letters or digits"),
        ('[categories."Bad Name"]\nterms = ["x"]', "a category name is"),
        ('[categories.weapons]\nterms = ["' + "x" * 201 + '"]', "the limit is 200"),
    ],
)
def test_a_broken_file_is_refused_with_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as caught:
        _policy(tmp_path, text)
    assert "policy.toml" in str(caught.value)  # names the file


def test_refused_patterns_would_really_be_slow() -> None:
    """The nested repeat refused above is the classic catastrophic one."""
    started = time.perf_counter()
    assert re.search(r"(a+)+b", "a" * 20 + "c") is None
    assert time.perf_counter() - started > 0.02  # exponential: already measurable at 20


def test_patterns_run_window_by_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pattern that backtracks (quadratic here) costs the square of a window, not of the
    text: 20 times the text is about 20 times the work, not 400 times, measured side by side."""
    monkeypatch.setattr(policy_module, "PATTERN_WINDOW", 1_000)
    monkeypatch.setattr(policy_module, "PATTERN_OVERLAP", 100)
    policy = _policy(tmp_path, '[categories.x]\npatterns = ["a+b"]\n')

    def seconds(text: str) -> float:
        started = time.perf_counter()
        assert policy.category_hit(text) is None
        return time.perf_counter() - started

    small = min(seconds("a" * 1_000 + "c") for _ in range(3))
    assert seconds("a" * 20_000 + "c") < 100 * small
    assert policy.category_hit("z" * 25_000 + " ab") == "x"  # the last window is matched too


def test_a_missing_file_is_named() -> None:
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policy(Path("/nonexistent/policy.toml"))


def test_reload_keeps_the_old_policy_when_the_new_file_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY, encoding="utf-8")
    holder = PolicyHolder(path)
    path.write_text("[categories.weapons\n", encoding="utf-8")
    with pytest.raises(PolicyError):
        holder.reload()
    assert holder.current.category_hit("zorblax") == "weapons"
    path.write_text('[categories.gadgets]\nterms = ["gizmo"]\n', encoding="utf-8")
    assert holder.reload().category_hit("gizmo") == "gadgets"
    assert holder.current.category_hit("zorblax") is None


def test_a_broken_file_stops_the_start_naming_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[categories.weapons]\npatterns = ["(a+)+"]\n', encoding="utf-8")
    settings = make_settings(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        "http://127.0.0.1:9/",
        "http://127.0.0.1:9/",
        content_policy=path,
    )
    with pytest.raises(PolicyError, match=r"^CHARFORGE_CONTENT_POLICY: .*policy\.toml"):
        build_container(settings)
