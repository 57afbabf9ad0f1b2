"""The studio's static files without a browser: every word the pages ask for exists in English and Chinese,
and nothing in them points outside the server (no CDN, font or analytics address)."""

from __future__ import annotations

import re

from aigc.models import FAMILIES
from aigc.server import schemas, workbench
from aigc.studio import STATIC


def words() -> dict[str, set[str]]:
    source = (STATIC / "i18n.js").read_text(encoding="utf-8")
    blocks = re.split(r"^\s{2}(en|zh): \{$", source, flags=re.M)
    found = dict(zip(blocks[1::2], blocks[2::2], strict=True))
    return {lang: set(re.findall(r'"([a-z_.]+)":', text.split("\n  },")[0])) for lang, text in found.items()}


def asked() -> set[str]:
    app = (STATIC / "app.js").read_text(encoding="utf-8")
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    keys = set(re.findall(r'\bt\("([a-z_.]+)"', app)) | set(re.findall(r'\bfield\("([a-z_.]+)"', app))
    keys |= set(re.findall(r'data-i18n="([a-z_.]+)"', html))
    keys |= {k for k in re.findall(r'\["([a-z_.]+)"', app) if "." in k}  # table headers listed as keys
    options = {c for names in workbench.CONTROLS.values() for c in names}
    options |= {o for fam in FAMILIES.values() for o in fam.sampler_options} | {"seed"}
    keys |= {f"opt.{o}" for o in options}
    keys |= {f"status.{s}" for s in ("running", "done", "failed", "interrupted")}
    keys |= {f"modality.{m}" for m in ("text", "image", "series", "music", "video")}
    keys |= {f"nav.{p}" for p in re.findall(r"^pages\.(\w+) =", app, flags=re.M)}
    keys |= {f"arena.{w}" for w in ("left", "right", *schemas.VoteRequest.model_fields["winner"].annotation.__args__)}
    keys |= {f"train.{p}" for p in (*workbench.PRESETS, "custom")}
    # every quoted "namespace.word" of a namespace the pages use (e.g. the later keys of a list of table headers)
    namespaces = {k.split(".")[0] for k in keys if "." in k}
    keys |= {k for k in re.findall(r'"([a-z]+\.[a-z_]+)"', app) if k.split(".")[0] in namespaces}
    return keys


def test_every_word_the_pages_ask_for_exists_in_both_languages():
    have = words()
    assert set(have) == {"en", "zh"}
    wanted = asked()
    assert len(wanted) > 100
    assert sorted(wanted - have["en"]) == []
    assert sorted(wanted - have["zh"]) == []
    assert have["en"] == have["zh"]


def test_the_navigation_names_every_place_in_both_languages():
    source = (STATIC / "i18n.js").read_text(encoding="utf-8")
    names_of = {"en": "Models Generate History Arena Train Sweeps Compare",
                "zh": "模型 生成 历史 竞技场 训练 扫参 比较"}
    for lang, names in names_of.items():
        for page, name in zip(("models", "generate", "history", "arena", "train", "sweeps", "compare"), names.split(),
                              strict=True):
            assert re.search(rf'"nav\.{page}": "{name}"', source), (lang, page)


def test_nothing_in_the_studio_points_outside_the_server():
    outside = []
    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8")
        for url in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text):
            if "www.w3.org/2000/svg" not in url:  # the SVG namespace: a name, never fetched
                outside.append(f"{path.name}: {url}")
    assert outside == []
