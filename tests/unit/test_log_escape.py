"""The text log format keeps one record on one line whatever its arguments hold."""

from __future__ import annotations

import json
import logging
import sys

from charforge.observability.logs import JsonFormatter, TextFormatter

FORGED = "diving.safetensors\n2026-01-01 00:00:00,000 INFO charforge.auth: admin signed in"


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = sys.exc_info() if exc else None
    return logging.LogRecord("charforge.test", logging.WARNING, __file__, 1, msg, args, info)


def test_a_newline_in_a_model_name_stays_on_its_line() -> None:
    line = TextFormatter().format(_record("backend %s failed to load %s", "a1", FORGED))
    assert "\n" not in line
    assert "diving.safetensors\\n2026-01-01" in line
    assert line.endswith("admin signed in")


def test_other_controls_are_escaped_and_tab_and_text_kept() -> None:
    line = TextFormatter().format(_record("name %s", "a\rb\x1b[2Jc\x00d\x85e\u2028f\tg é 漢"))
    assert line.endswith("name a\\rb\\x1b[2Jc\\x00d\\x85e\\u2028f\tg é 漢")


def test_a_traceback_keeps_its_lines_after_the_escaped_message() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed on %s", "x\ny", exc=True)
    text = TextFormatter().format(record)
    first, *rest = text.split("\n")
    assert first.endswith("failed on x\\ny")
    assert rest[0] == "Traceback (most recent call last):"


def test_the_json_format_is_one_line_already() -> None:
    line = JsonFormatter().format(_record("backend %s failed to load %s", "a1", FORGED))
    assert "\n" not in line
    assert json.loads(line)["message"].endswith(FORGED)
