"""The README, for the tests that check it says what the code does."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_section(heading: str) -> str:
    """The text under `## heading`, up to the next `## ` heading (its `###` subsections included)."""
    return README.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
