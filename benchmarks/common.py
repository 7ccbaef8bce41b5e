"""What every benchmark's command line does with its result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit_result(result: dict[str, Any], out: Path | None) -> int:
    """Print the result as JSON, also write it to `out` when given; exit status 0 when it passed."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0 if result["passed"] else 1
