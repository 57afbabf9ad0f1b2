"""What the studio's browser tests share: Debian's Chromium (Playwright drives it through `executable_path` and never
downloads a browser). The `browser` fixture (tests/conftest.py) launches it once per test module."""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = next((p for p in ("/usr/bin/chromium-headless-shell", "/usr/bin/chromium", shutil.which("chromium") or "")
                 if p and Path(p).is_file()), None)
