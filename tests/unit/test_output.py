"""How received bodies are decoded and printed (no daemon)."""

from __future__ import annotations

import pytest

from ipcd import errors
from ipcd.client import Message
from ipcd.commands import one_line

DEEP = "[" * 100_000 + "]" * 100_000  # accepted by nothing that recurses per level


def test_one_line_compacts_pretty_json_and_leaves_one_line_bodies_alone():
    assert one_line('{\n  "a": [1,\r\n 2]\n}') == '{"a":[1,2]}'
    assert one_line('{"a": 1}') == '{"a": 1}'  # already one line: printed as stored


def test_one_line_falls_back_to_spaces_when_too_deep_to_decode():
    pretty = DEEP[:50] + "\n" + DEEP[50:] + "\r\n"
    assert one_line(pretty) == pretty.replace("\r", " ").replace("\n", " ")


def test_message_body_too_deep_is_a_data_error_and_text_still_works():
    m = Message(None, "q", (1, 2, DEEP, 1, 0.0, None))
    with pytest.raises(errors.DataError, match="nested too deeply"):
        m.body
    assert m.text == DEEP
