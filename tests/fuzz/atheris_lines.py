"""Coverage-guided fuzzing of the publish command's line reader with atheris (libFuzzer).

    python tests/fuzz/atheris_lines.py -runs=20000 [CORPUS_DIR]

A harness, not a test module: libFuzzer ends the process when its runs are done, so
tests/integration/test_fuzz_atheris.py starts it as a subprocess. Any exception other than the
line reader's named refusals, or a refusal that is not one printable line naming its line,
is a crash: libFuzzer prints the input and exits non-zero.
"""

from __future__ import annotations

import io
import sys

import atheris

with atheris.instrument_imports(include=["delivery"]):
    from delivery.cli.lines import read_events
    from delivery.errors import InputError


def one_input(data: bytes) -> None:
    for number, outcome in read_events(io.BytesIO(data)):
        if isinstance(outcome, InputError):
            message = str(outcome)
            if not (message.startswith(f"line {number}: ") and message.isprintable()):
                raise AssertionError(f"refusal not one printable line naming line {number}: {message!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
