"""Uploads (aigc.uploads): a text file, a zip of images, a CSV series, each checked as training would read it;
every refusal says why in plain words and leaves nothing on disk."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image
from tests.conftest import make_poems

from aigc.data.images import load_images
from aigc.data.series import SeriesDataConfig, load_series
from aigc.data.text import load_corpus
from aigc.errors import BadRequest, NotFound, TooLarge, UserError
from aigc.uploads import MIN_SERIES_ROWS, MIN_TEXT_CHARS, Upload, get_upload, list_uploads, uploads_dir

POEMS = "\n%\n".join(make_poems()).encode("utf-8")


def upload(kind: str, filename: str, data: bytes, max_bytes: int = 10**6, chunk: int = 1000) -> dict:
    up = Upload.begin(kind, filename, max_bytes)
    for i in range(0, len(data), chunk):
        up.write(data[i:i + chunk])
    return up.finish()


def left_on_disk() -> list[str]:
    return sorted(p.name for p in uploads_dir().iterdir()) if uploads_dir().exists() else []


def png(size=(8, 8), value=0, mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def csv(rows: int, header="date,sales,visits,note") -> bytes:
    lines = [header] + [f"{2000 + i // 12}-{1 + i % 12:02d}-01,{10 + i * 1.5},{i % 7},x{i}" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


# --- text ------------------------------------------------------------------------------------------


def test_text_upload_is_recorded_and_trainable():
    record = upload("text", "../../somewhere/poems.txt", POEMS)
    assert record["id"].startswith("upl-") and record["kind"] == "text"
    assert record["filename"] == "poems.txt"  # the base name only
    assert record["bytes"] == len(POEMS)
    assert len(record["sha256"]) == 64 and record["created"]
    folder = uploads_dir() / record["id"]
    assert record["data"] == str(folder / "poems.txt")
    corpus = load_corpus(record["data"])  # what `aigc train --data` reads
    assert record["summary"] == {"characters": corpus.n_chars, "documents": 40}
    assert get_upload(record["id"]) == record
    assert left_on_disk() == [record["id"]]  # no partial folder left


def test_list_uploads_newest_first_and_get_checks_the_id():
    first = upload("text", "a.txt", POEMS)
    second = upload("text", "b.jsonl", b'{"text": "' + ("spring river flowers " * 20).encode() + b'"}\n')
    assert second["data"].endswith("b.jsonl")
    assert [r["id"] for r in list_uploads()] == [second["id"], first["id"]]
    for bad in ("upl-" + "0" * 20, "../runs", "upl-../../etc", first["id"] + "/upload.json", ""):
        with pytest.raises(NotFound):
            get_upload(bad)


def test_text_with_another_suffix_stays_text():
    record = upload("text", "notes.csv", POEMS)  # a .csv would make `aigc train` read a series
    assert record["data"].endswith("notes.txt")


@pytest.mark.parametrize("data, message", [
    (b"", "the file is empty"),
    (b"hello\x00world " * 50, "binary file, not text"),
    ("café ".encode("latin-1") * 100, "binary file, not text"),
    (b"a short note", f"too little text.*at least {MIN_TEXT_CHARS}"),
    (b"   \n\n  \n", "no non-whitespace text"),
])
def test_text_refused(data, message):
    with pytest.raises(BadRequest, match=message):
        upload("text", "t.txt", data)
    assert left_on_disk() == []


def test_jsonl_without_the_field_is_refused_without_server_paths():
    with pytest.raises(BadRequest) as e:
        upload("text", "d.jsonl", b'{"body": "x"}\n' * 30)
    assert "no field 'text'" in str(e.value) and str(uploads_dir()) not in str(e.value)
    assert left_on_disk() == []


def test_too_large_is_refused_at_once_and_deleted():
    up = Upload.begin("text", "big.txt", 1000)
    up.write(b"x" * 600)
    with pytest.raises(TooLarge, match=r"0.000954 MB.*aigc serve --max-upload-mb N") as e:
        up.write(b"x" * 600)
    assert isinstance(e.value, UserError)
    assert left_on_disk() == []
    with pytest.raises(RuntimeError):
        up.finish()


def test_abort_deletes_everything():
    up = Upload.begin("series", "s.csv", 10**6)
    up.write(b"a,b\n")
    up.abort()
    assert left_on_disk() == []


def test_unknown_kind_and_filename_sanitised():
    with pytest.raises(BadRequest, match="text, images, series, music, sounds, video"):
        Upload.begin("pdf", "x.pdf", 10**6)
    up = Upload.begin("text", "C:\\Users\\me\\..\\.secret\x07.txt", 10**6)
    assert up.filename == "secret.txt"
    up.abort()


# --- images ----------------------------------------------------------------------------------------


def test_images_with_class_folders_inside_one_top_folder():
    zipped = make_zip({"shapes/circle/a.png": png(value=10), "shapes/circle/b.png": png(value=20),
                       "shapes/square/c.png": png(value=200), "shapes/readme.txt": b"about the shapes",
                       "__MACOSX/shapes/._a.png": b"junk", "shapes/.hidden.png": b"junk"})
    record = upload("images", "my shapes.zip", zipped)
    assert record["data"] == str(uploads_dir() / record["id"] / "my-shapes")
    assert record["summary"] == {"images": 3, "classes": ["circle", "square"], "size": [8, 8], "channels": 1,
                                 "class_counts": {"circle": 2, "square": 1}}
    data = load_images(record["data"])
    assert data.class_names == ("circle", "square") and list(data.labels) == [0, 0, 1]
    assert not (uploads_dir() / record["id"] / "upload.part").exists()  # the zip itself is not kept


def test_images_without_classes():
    zipped = make_zip({f"{i}.png": png(size=(6, 4), value=i * 30, mode="RGB") for i in range(4)})
    record = upload("images", "flat.zip", zipped)
    assert record["summary"] == {"images": 4, "classes": [], "size": [6, 4], "channels": 3}
    assert load_images(record["data"]).labels is None


@pytest.mark.parametrize("members, message", [
    (None, "not a zip file"),
    ({"notes.txt": b"no pictures here"}, r"no images in the zip \(PNG, JPEG"),
    ({"a.png": b"not really a png", "b.jpg": b"nor this"}, r"no images in the zip \(PNG, JPEG"),
    ({"a.png": png(), "b.png": b"broken"}, "b.png in the zip is not an image"),
    ({"a.png": png(), "../evil.png": png()}, r"leads outside its folder \(../evil.png\)"),
    ({"a.png": png(), "/etc/evil.png": png()}, "leads outside its folder"),
    ({"a.png": png(), "big.png": bytes(1_000_000)}, "zip unpacks to .* more than 10 times the upload limit"),
    ({"a.png": png((8, 8)), "b.png": png((16, 16))}, "differ in size: a.png is 8x8 but b.png is 16x16"),
    ({"cats/a.png": png(), "b.png": png()}, "class sub-folders"),
])
def test_images_refused(members, message):
    data = b"PK but not a zip at all " * 20 if members is None else make_zip(members)
    with pytest.raises(BadRequest, match=message) as e:
        upload("images", "pictures.zip", data, max_bytes=20_000)
    assert str(uploads_dir()) not in str(e.value)
    assert left_on_disk() == []


# --- series ----------------------------------------------------------------------------------------


def test_series_upload():
    record = upload("series", "shop sales", csv(30))
    assert record["data"].endswith("shop-sales.csv")  # .csv: `aigc train` reads a series
    assert record["summary"] == {"rows": 30, "columns": ["sales", "visits"], "missing": {}}
    series = load_series(record["data"], SeriesDataConfig(column="sales", time_column="date"))
    assert np.allclose(series.values[:2], [10, 11.5])


def test_series_missing_values_are_counted():
    data = b"value\n" + b"\n".join(str(i % 5).encode() if i % 10 else b"" for i in range(40)) + b"\n"
    assert upload("series", "v.csv", data)["summary"] == {"rows": 40, "columns": ["value"], "missing": {"value": 4}}


@pytest.mark.parametrize("data, message", [
    (b"a,b\n1,2\n3,4,5,6\n", "not a CSV file that can be read"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "binary file, not a CSV"),
    (b"name,city\n" + b"ann,paris\n" * 30, r"no numeric column in the CSV \(columns: name, city\)"),
    (csv(MIN_SERIES_ROWS - 1), f"too few rows: {MIN_SERIES_ROWS - 1}; a series needs at least {MIN_SERIES_ROWS}"),
    (b"", "the file is empty"),
])
def test_series_refused(data, message):
    with pytest.raises(BadRequest, match=message):
        upload("series", "s.csv", data)
    assert left_on_disk() == []
