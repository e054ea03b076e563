"""Which heavy libraries some code imports, seen in a fresh interpreter (the test process has
imported everything already)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable


def heavy_modules_loaded(code: str, heavy: Iterable[str]) -> list[str]:
    """Run `code` (after `import json, sys`) in a new Python process; the modules of `heavy`
    that are in its sys.modules afterwards."""
    script = (
        "import json, sys\n"
        + code
        + f"\nprint(json.dumps([m for m in {tuple(heavy)!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
