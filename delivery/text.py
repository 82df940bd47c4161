"""Untrusted bytes made safe to store and show: a subscriber's reply (compressed, binary, NUL
bytes, invalid UTF-8, huge), an error text, a poison message's body become printable text of
bounded length that PostgreSQL's ``text`` and a terminal accept. Bad bytes are escaped
(``\\x00``, ``\\xff``), never dropped, so an operator still sees what came back."""

from __future__ import annotations

import re

# C0 and C1 control characters except tab, newline and carriage return; NUL among them, which
# PostgreSQL's text type refuses (the outcome insert failed on it and the attempt looped).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def safe_text(raw: bytes | str, *, limit_chars: int) -> str:
    """``raw`` as printable text of at most ``limit_chars`` characters: invalid UTF-8 and
    control characters escaped, a cut marked with an ellipsis."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    # Lone surrogates cannot be encoded for PostgreSQL either.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = _CONTROL.sub(_escape, text)
    if len(text) > limit_chars:
        return text[: max(limit_chars - 1, 0)] + "…"
    return text
