"""The input of ``delivery publish``: JSON lines read as bytes, one event per line.

Each line is judged on its own, so one bad line is named and the rest still checked: a line
longer than ``MAX_LINE_BYTES`` is skipped without being held in memory, then the line is decoded
as strict UTF-8, parsed as JSON (a duplicate key is refused: JSON parsers disagree on which
value wins) and validated as an event envelope. Every refusal is an ``InputError`` whose message
is one printable line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from delivery.errors import InputError
from delivery.events import NewEvent, parse_event, shown

MAX_LINE_BYTES = 1_000_000
_SKIP_CHUNK_BYTES = 65_536
_BOM = b"\xef\xbb\xbf"


def read_lines(stream: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, content)`` for every non-blank line; ``None`` as the content of a line
    over ``MAX_LINE_BYTES`` (its bytes are read past, never kept)."""
    number = 0
    while True:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if number == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]  # an editor's byte order mark is not part of the event
        content = line[:-1] if line.endswith(b"\n") else line
        if len(content) > MAX_LINE_BYTES:
            _skip_rest_of_line(stream, line)
            yield number, None
        elif content.strip():
            yield number, content


def _skip_rest_of_line(stream: BinaryIO, start: bytes) -> None:
    chunk = start
    while chunk and not chunk.endswith(b"\n"):
        chunk = stream.readline(_SKIP_CHUNK_BYTES)


def parse_line(content: bytes) -> NewEvent:
    """One line's bytes as a validated event; ``InputError`` saying what is wrong with it."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"is not valid UTF-8 (byte 0x{content[exc.start]:02x} at column {exc.start + 1})"
        ) from None
    try:
        raw = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except _JSONRefused as exc:
        raise InputError(f"invalid JSON: {exc}") from None
    except ValueError:  # an integer literal past Python's digit limit
        raise InputError("invalid JSON: a number is too long") from None
    except RecursionError:
        raise InputError("invalid JSON: nested too deeply") from None
    return parse_event(raw)


def read_events(stream: BinaryIO) -> Iterator[tuple[int, NewEvent | InputError]]:
    """Every non-blank line of ``stream`` as an event, or the ``InputError`` that refused it
    (its message starts with ``line N:``). Never raises ``InputError`` itself."""
    for number, content in read_lines(stream):
        if content is None:
            too_long = f"line {number}: is longer than 1 MB ({MAX_LINE_BYTES:,} bytes)"
            yield number, InputError(too_long)
            continue
        try:
            yield number, parse_line(content)
        except InputError as exc:
            yield number, InputError(f"line {number}: {exc}")


class _JSONRefused(ValueError):
    """Valid JSON that we refuse anyway (a duplicate key, NaN)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _JSONRefused(f"duplicate key '{shown(key)}'")
            seen.add(key)
    return obj


def _no_constant(name: str) -> Any:
    raise _JSONRefused(f"{name} is not a JSON number")
