"""The web studio (docs/studio.md): pages for people who do not program, served at `/` by `aigc serve`.

The pages are static files of this package (HTML, CSS and plain JavaScript: nothing from a CDN, no build
step) and call the same /v1 API as every other client, so no action of theirs is missing from the API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount(app: FastAPI) -> None:
    """The studio at `/` (its page) and `/studio/` (its scripts, styles and icon)."""
    app.mount("/studio", StaticFiles(directory=STATIC), name="studio")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})
