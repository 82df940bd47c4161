"""Untrusted bytes become text PostgreSQL stores and a terminal shows: whatever a subscriber
replies (compressed, binary, NUL, invalid UTF-8, huge), the excerpt is bounded printable text."""

from __future__ import annotations

import gzip

import pytest

from delivery.text import safe_text
from delivery.worker.sender import describe_body


def _storable(text: str) -> bool:
    """What PostgreSQL's text type and a terminal take: valid UTF-8, no NUL, no controls."""
    text.encode("utf-8")  # raises on a lone surrogate
    return not any(ord(c) < 0x20 and c not in "\t\n\r" for c in text) and "\x7f" not in text


@pytest.mark.parametrize(
    "raw",
    [
        gzip.compress(b'{"ok": true}' * 50, mtime=0),
        b"bad\x00reply",
        b"\xff\xfe\x00\x01invalid utf-8 \xc3\x28",
        bytes(range(256)),
        b"\x1b[31mred\x1b[0m",
    ],
    # Named, so every xdist worker collects the same ids.
    ids=["gzip", "nul", "invalid-utf8", "every-byte", "ansi-escape"],
)
def test_any_reply_becomes_storable_text(raw):
    text = safe_text(raw, limit_chars=1024)
    assert _storable(text)
    assert text  # escaped, never dropped


def test_bad_bytes_are_escaped_so_an_operator_still_sees_them():
    assert safe_text(b"bad\x00reply\xff", limit_chars=100) == "bad\\x00reply\\xff"
    assert safe_text("caf\u00e9\n\tok", limit_chars=100) == "caf\u00e9\n\tok"
    assert safe_text("lone \udcff surrogate", limit_chars=100) == "lone \\udcff surrogate"


def test_a_huge_reply_is_cut_at_the_limit_and_the_cut_is_marked():
    text = safe_text(b"\x00" * 10_000, limit_chars=100)
    assert len(text) == 100 and text.endswith("…")
    assert safe_text(b"x" * 10, limit_chars=10) == "x" * 10


def test_a_compressed_reply_is_named_not_decoded():
    raw = gzip.compress(b"hello")
    text = describe_body(raw, "gzip", limit_chars=200)
    assert text is not None and text.startswith("[gzip-encoded body, not decoded] ")
    assert _storable(text)
    assert describe_body(b"plain", "identity", limit_chars=200) == "plain"
    assert describe_body(b"", "gzip", limit_chars=200) is None
