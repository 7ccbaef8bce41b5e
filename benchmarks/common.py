"""What every benchmark's command line does with its result."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
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


def ratio_fields(ours: Sequence[Any], raw: Sequence[Any], target: float) -> dict[str, Any]:
    """The speed ratio of paired timings (objects with `wall` and `cpu` seconds; raw's time over ours, from
    the medians), its target, and two views robust to a machine shared with other work: the median of the
    ratios of back-to-back pairs, and the ratio of CPU seconds (all threads) spent by each side."""
    ratio = statistics.median(t.wall for t in raw) / statistics.median(t.wall for t in ours)
    return {
        "ratio": round(ratio, 3),
        "target": f">= {target}",
        "passed": ratio >= target,
        "paired_ratio": round(statistics.median(r.wall / o.wall for r, o in zip(raw, ours, strict=True)), 3),
        "cpu_ratio": round(statistics.median(t.cpu for t in raw) / statistics.median(t.cpu for t in ours), 3),
    }
