"""The always-on category: sexual content involving minors.

It lives in code, not in the policy file, so no file (missing, broken, or one that names the
category) can switch it off; a file may only add terms and patterns to it. Patterns run on the
folded text (see ``policy.fold``): lower case, words joined by single spaces, no punctuation.
"""

from __future__ import annotations

BUILTIN_CATEGORY = "sexual_minors"

BUILTIN_DESCRIPTION = "Sexual content involving minors (built in, always on)."

# Terms that name such content on their own.
BUILTIN_TERMS: tuple[str, ...] = (
    "loli",
    "lolicon",
    "shota",
    "shotacon",
    "jailbait",
    "child porn",
    "child pornography",
    "pedophile",
    "pedophilia",
    "paedophile",
    "paedophilia",
    "csam",
)

_MINOR = (
    r"child|children|kid|kids|minor|minors|underage|under age|preteen|pre teen|preteens|"
    r"tween|toddler|toddlers|infant|infants|schoolgirl|schoolgirls|schoolboy|schoolboys|"
    r"little girl|little girls|little boy|little boys|young girl|young girls|young boy|"
    r"young boys|(?:[1-9]|1[0-7]) ?(?:yo|y o|year old|years old|yr old|yrs old)"
)
_SEXUAL = (
    r"nude|nudes|nudity|naked|sex|sexy|sexual|sexualized|porn|porno|pornographic|nsfw|"
    r"erotic|erotica|lewd|topless|bottomless|undressed|genitals|genitalia|nipples|hentai|"
    r"orgasm|masturbating|masturbation|lingerie|fetish|seductive"
)

# A word for a minor and a sexual word anywhere in the same text. Two anchored lookaheads:
# each scans the text once, so the cost stays linear.
BUILTIN_PATTERNS: tuple[str, ...] = (rf"^(?=.*\b(?:{_MINOR})\b)(?=.*\b(?:{_SEXUAL})\b)",)
