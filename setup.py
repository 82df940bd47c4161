"""Metadata lives in pyproject.toml. This only bundles the top-level migrations/ and runbooks/
into the wheel, as delivery/_bundled/<name>/, where ``delivery.bundled`` finds them once
installed. An editable install reads them where they are in the checkout instead."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = {"migrations": "*.sql", "runbooks": "*.md"}


class BuildPyWithBundled(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for name, pattern in BUNDLED.items():
            source = ROOT / name
            files = sorted(source.glob(pattern))
            if not files:
                raise SystemExit(f"setup.py: no {pattern} in {source}: nothing to bundle")
            target = Path(self.build_lib) / "delivery" / "_bundled" / name
            target.mkdir(parents=True, exist_ok=True)
            for path in files:
                shutil.copy2(path, target / path.name)


setup(cmdclass={"build_py": BuildPyWithBundled})
