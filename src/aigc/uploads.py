"""Data a person uploads from a browser: a text file, a zip of images, a CSV series, a zip of MIDI files, a zip of
sounds (WAV/FLAC/OGG, a folder per class), or clips (a GIF/MP4/AVI file, or a zip of them); and a MIDI file sent
inside a music request (`keep_midi`: an opening to continue, a melody to harmonise), kept by its content.

An upload arrives in chunks (`Upload.begin`, `.write` ..., `.finish`) into a hidden folder under
`$AIGC_HOME/uploads/`; `finish` checks that the data can be trained on, as `aigc train` would read it, and
only then moves the folder into place as `uploads/<id>/` with its record `upload.json`. A refused upload
leaves nothing behind. The record's `data` is the path to pass to `aigc train --data` (or to
`aigc.jobs.start_training(data=...)`).

The CSV check imports pandas where it runs; the clip check reads with aigc.data.video (torch at import: only the
server, which has torch loaded already, imports this module).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import time
import unicodedata
import zipfile
from pathlib import Path, PurePosixPath

from aigc import store
from aigc.data.images import IMAGE_EXTENSIONS, load_images
from aigc.data.music import MIDI_EXTENSIONS, load_music, midi_piece, remove_copies
from aigc.data.sounds import SOUND_EXTENSIONS, SoundDataConfig, list_files, read_audio, split_files
from aigc.data.text import load_corpus
from aigc.data.video import VIDEO_EXTENSIONS, VideoDataConfig, read_video
from aigc.errors import BadRequest, NotFound, TooLarge, UserError
from aigc.fsutil import atomic_write_bytes, fsync_dir, read_json, write_json

KINDS = ("text", "images", "series", "music", "sounds", "video")
RECORD = "upload.json"
MIN_TEXT_CHARS = 200  # less text than this is too little to train on (and to split off a validation part)
MIN_SERIES_ROWS = 24  # two years of monthly values: the least a series model and its back-test can use
ZIP_RATIO = 10  # a zip that unpacks to more than 10x the upload limit is refused (a zip bomb)
MAX_MIDI_BYTES = 2**20  # a MIDI file inside a request (`keep_midi`): a melody or an opening, not a symphony
MIDI_FOLDER = "midi"  # uploads/midi/: the MIDI files requests carried, by content
PARTIAL_MAX_AGE_S = 24 * 3600  # hidden partial folders older than this (a server that crashed) are swept
_ID = re.compile(r"upl-[0-9a-f]{20}")
_PARTIAL = ".partial-"
_RAW = "upload.part"
_IMAGE_NAMES = "PNG, JPEG, GIF, BMP, WebP"


def uploads_dir() -> Path:
    return store.aigc_home() / "uploads"


class Upload:
    """One file arriving in chunks: `Upload.begin(...)`, `.write(chunk)` for each chunk, then `.finish()` (or
    `.abort()`). Not shared between threads: one request writes one upload."""

    def __init__(self, id: str, kind: str, filename: str, max_bytes: int, folder: Path):
        self.id = id
        self.kind = kind
        self.filename = filename  # the base name the browser sent, sanitised
        self.max_bytes = max_bytes
        self.folder = folder  # the hidden partial folder; uploads_dir()/<id> once finished
        self.bytes = 0
        self._sha256 = hashlib.sha256()
        self._file = None
        self._open = True

    @classmethod
    def begin(cls, kind: str, filename: str, max_bytes: int) -> Upload:
        if kind not in KINDS:
            raise BadRequest(f"unknown upload kind {kind!r}: choose from {', '.join(KINDS)}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise BadRequest(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        root = uploads_dir()
        root.mkdir(parents=True, exist_ok=True)
        _sweep_partials(root)
        upload_id = _new_id("upl")
        folder = root / f"{_PARTIAL}{upload_id}"
        folder.mkdir()
        upload = cls(upload_id, kind, base_name(filename), max_bytes, folder)
        upload._file = open(folder / _RAW, "wb")  # closed by finish or abort
        return upload

    def write(self, chunk: bytes) -> None:
        """Append a chunk; past `max_bytes` in all, the upload is deleted and TooLarge raised."""
        self._check_open()
        self.bytes += len(chunk)
        if self.bytes > self.max_bytes:
            self.abort()
            raise TooLarge(f"the file is larger than the upload limit of {_mb(self.max_bytes)} MB; whoever runs the "
                           f"server can raise it with: aigc serve --max-upload-mb N")
        self._file.write(chunk)
        self._sha256.update(chunk)

    def abort(self) -> None:
        """Delete everything written so far (safe to call twice)."""
        if self._file is not None:
            self._file.close()
        self._open = False
        shutil.rmtree(self.folder, ignore_errors=True)

    def finish(self) -> dict:
        """Check the data, then move it into place as uploads_dir()/<id>/; returns the record (upload.json).
        A check that fails deletes everything and raises BadRequest saying what is wrong."""
        self._check_open()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._open = False
        final = uploads_dir() / self.id
        try:
            if self.bytes == 0:
                raise BadRequest("the file is empty")
            check = {"text": _lay_out_text, "images": _lay_out_images, "series": _lay_out_series,
                     "music": _lay_out_music, "sounds": _lay_out_sounds, "video": _lay_out_video}[self.kind]
            data_name, summary = check(self)
            record = {"id": self.id, "kind": self.kind, "filename": self.filename, "bytes": self.bytes,
                      "sha256": self._sha256.hexdigest(), "created": store.now(), "data": str(final / data_name),
                      "summary": summary}
            write_json(self.folder / RECORD, record)
            os.replace(self.folder, final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        return record

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError(f"upload {self.id} is already finished or aborted")


def keep_midi(data: bytes, what: str) -> Path:
    """A MIDI file sent inside a request (an opening to continue, a melody to harmonise), checked as `aigc generate
    --prompt-midi` reads a file and kept by its content as uploads/midi/<sha256, 16 digits>.mid: the generation's
    record names a file that stays, and the request sent again finds the same notes. `what` names it in errors."""
    if len(data) > MAX_MIDI_BYTES:
        raise TooLarge(f"{what}: the MIDI file is {_mb(len(data))} MB, more than the {_mb(MAX_MIDI_BYTES)} MB a "
                       "request may carry")
    midi_piece(data, what, what)  # BadRequest for a file that is not MIDI or has no notes: nothing is written
    path = kept_midi_path(data)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return path


def kept_midi_path(data: bytes) -> Path:
    """Where `keep_midi` keeps these bytes."""
    return uploads_dir() / MIDI_FOLDER / f"{hashlib.sha256(data).hexdigest()[:16]}.mid"


def get_upload(upload_id: str) -> dict:
    """The record of a finished upload (NotFound for an id that is not one: nothing outside uploads_dir() is read)."""
    path = uploads_dir() / upload_id / RECORD if isinstance(upload_id, str) and _ID.fullmatch(upload_id) else None
    if path is None or not path.is_file():
        raise NotFound(f"no such upload: {upload_id!r}")
    return read_json(path)


def list_uploads() -> list[dict]:
    """The records of every finished upload, newest first."""
    root = uploads_dir()
    if not root.is_dir():
        return []
    records = [read_json(p / RECORD) for p in root.iterdir() if _ID.fullmatch(p.name) and (p / RECORD).is_file()]
    return sorted(records, key=lambda r: (r["created"], r["id"]), reverse=True)


def base_name(filename: str) -> str:
    """The last part of a browser's file name, without folders, control characters or leading dots."""
    name = re.split(r"[/\\]", filename or "")[-1]
    name = "".join(c for c in unicodedata.normalize("NFC", name) if unicodedata.category(c)[0] != "C")
    return name.strip().lstrip(".").strip()[:200] or "upload"


# ----------------------------------------------------------------------------------
# the checks, one per kind: each lays the data out inside the upload's folder and returns
# (the name of the data inside the folder, the summary)


def _lay_out_text(upload: Upload) -> tuple[str, dict]:
    raw = upload.folder / _RAW
    _check_text_bytes(raw.read_bytes(), "text (UTF-8)")
    # the suffix tells load_corpus (and `aigc train`) how to read it: .jsonl, else plain or fortune text
    suffix = Path(upload.filename).suffix.lower()
    name = _safe_stem(upload.filename, "text") + (suffix if suffix in (".txt", ".jsonl") else ".txt")
    os.replace(raw, upload.folder / name)
    try:
        corpus = load_corpus(str(upload.folder / name))
    except UserError as e:
        raise BadRequest(_plain(str(e), upload.folder, name)) from None
    if corpus.n_chars < MIN_TEXT_CHARS:
        raise BadRequest(f"too little text to train on: {corpus.n_chars} characters; upload at least "
                         f"{MIN_TEXT_CHARS}")
    return name, {"characters": corpus.n_chars, "documents": len(corpus.docs)}


def _lay_out_series(upload: Upload) -> tuple[str, dict]:
    import pandas as pd

    raw = upload.folder / _RAW
    _check_text_bytes(raw.read_bytes(), "a CSV file (UTF-8 text)")
    name = _safe_stem(upload.filename, "series") + ".csv"  # .csv: what makes `aigc train` read a series
    path = upload.folder / name
    os.replace(raw, path)
    try:
        # as aigc.data.series reads it: blank lines are rows of missing values
        frame = pd.read_csv(path, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        reason = _plain(str(e).splitlines()[0], upload.folder, name)
        raise BadRequest(f"this is not a CSV file that can be read: {reason}") from None
    numeric, missing = [], {}
    for column in frame.columns:
        values = frame[column]
        present = values.notna() & (values.astype(str).str.strip() != "")
        if present.any() and pd.to_numeric(values[present], errors="coerce").notna().all():
            numeric.append(str(column))
            if (~present).any():
                missing[str(column)] = int((~present).sum())
    if not numeric:
        raise BadRequest(f"no numeric column in the CSV (columns: {', '.join(map(str, frame.columns))})")
    if len(frame) < MIN_SERIES_ROWS:
        raise BadRequest(f"too few rows: {len(frame)}; a series needs at least {MIN_SERIES_ROWS}")
    return name, {"rows": len(frame), "columns": numeric, "missing": missing}


def _lay_out_images(upload: Upload) -> tuple[str, dict]:
    name = _folder_name(upload, "images")
    out = upload.folder / name
    _unzip(upload, out, IMAGE_EXTENSIONS, "this is not a zip file: upload a .zip of images",
           f"no images in the zip ({_IMAGE_NAMES})")
    _check_image_files(out)
    try:
        data = load_images(str(out))
    except UserError as e:
        raise BadRequest(_plain(str(e), out, "the zip")) from None
    summary = {"images": data.n, "classes": list(data.class_names or ()), "size": [data.width, data.height],
               "channels": data.channels}
    if data.class_names:  # load_images: every sub-folder of the zip's top is a class
        counts = [int((data.labels == i).sum()) for i in range(data.num_classes)]
        summary["class_counts"] = dict(zip(data.class_names, counts, strict=True))
    return name, summary


def _lay_out_music(upload: Upload) -> tuple[str, dict]:
    """A zip of MIDI files (or one MIDI file), read as `aigc train --data` reads a folder of them: every file must
    parse and have notes, and there must be two different pieces (one to train on, one to hold out)."""
    raw = upload.folder / _RAW
    name = _folder_name(upload, "music")
    with open(raw, "rb") as f:
        midi = f.read(4) == b"MThd"
    if midi:
        suffix = Path(upload.filename).suffix.lower()
        name += suffix if suffix in MIDI_EXTENSIONS else ".mid"
        os.replace(raw, upload.folder / name)
    else:
        _unzip(upload, upload.folder / name, MIDI_EXTENSIONS,
               "this is neither a MIDI file nor a zip file: upload a .zip of MIDI files",
               "no MIDI files in the zip (.mid, .midi)")
    try:
        pieces, _ = load_music(str(upload.folder / name))
    except UserError as e:
        raise BadRequest(_plain(str(e), upload.folder, name)) from None
    unique = remove_copies(pieces)
    if len(unique) < 2:
        raise BadRequest(f"{len(unique)} different piece(s): a music run needs at least 2 (one to train on, one to "
                         f"hold out); upload a .zip of MIDI files")
    return name, {"pieces": len(pieces), "copies": len(pieces) - len(unique),
                  "notes": sum(len(p.notes) for p in pieces)}


def _lay_out_sounds(upload: Upload) -> tuple[str, dict]:
    """A zip of WAV/FLAC/OGG files, read as `aigc train --data` reads a folder of them (aigc.data.sounds): a
    sub-folder per class, or every file at the top (no classes); every file a sound that can be read, of at most
    MAX_FILE_SECONDS; at least two files (one to train on, one to hold out) and, with classes, two classes."""
    name = _folder_name(upload, "sounds")
    out = upload.folder / name
    _unzip(upload, out, SOUND_EXTENSIONS, "this is not a zip file: upload a .zip of WAV/FLAC files (a folder per "
           "class)", "no sounds in the zip (WAV, FLAC, OGG)")
    cfg = SoundDataConfig()
    try:
        files, class_names, _ = list_files(str(out))
        for file in files:
            read_audio(file.path, cfg)  # every check training makes: readable, not too long, finite
        split_files(files, cfg)
    except UserError as e:
        raise BadRequest(_plain(str(e), out, "the zip")) from None
    if class_names is not None and len(class_names) < 2:
        raise BadRequest(f"one class folder ({class_names[0]}): classes need two or more folders; add another class, "
                         f"or put every file at the top of the zip for sounds without classes")
    summary = {"sounds": len(files), "classes": list(class_names or ())}
    if class_names:
        summary["class_counts"] = {c: sum(f.label == i for f in files) for i, c in enumerate(class_names)}
    return name, summary


def _lay_out_video(upload: Upload) -> tuple[str, dict]:
    """One GIF/MP4/AVI file, or a zip of them (a sub-folder per class, or every file at the top), read as `aigc train
    --data` reads them (aigc.data.video.read_video): every file readable, of 2 to MAX_FRAMES frames of one size, at
    most MAX_SIDE pixels a side; every file the same size; enough frames for two clips (one to hold out). Where
    clips of the default length (20 frames) do not fit, the summary's `train_sets` says the clip length (and the
    predictor's context) that training on the files needs."""
    raw = upload.folder / _RAW
    name = _folder_name(upload, "clips")
    with open(raw, "rb") as f:
        head = f.read(12)
    suffix = _clip_suffix(head)
    if suffix:  # one clip file: the data is the file (named by what it holds, whatever the browser called it)
        name += suffix
        os.replace(raw, upload.folder / name)
        root, files = upload.folder, [upload.folder / name]
    else:
        root = upload.folder / name
        _unzip(upload, root, VIDEO_EXTENSIONS, "this is neither a clip (GIF, MP4, AVI) nor a zip file: upload a "
               ".gif or .mp4 file, or a .zip of them", "no clips in the zip (GIF, MP4, AVI)")
        files = sorted(p for p in root.rglob("*") if p.is_file())
    rels = [f.relative_to(root).as_posix() for f in files]
    class_names = sorted({r.split("/")[0] for r in rels if "/" in r})
    if class_names and any("/" not in r for r in rels):
        raise BadRequest(f"the zip has class folders ({', '.join(class_names)}) and also clips at its top "
                         f"({next(r for r in rels if '/' not in r)}): put every clip in a class folder, or none")
    shape, lengths, gray = None, {}, True
    for file, rel in zip(files, rels, strict=True):
        try:
            frames = read_video(file)  # (T, H, W, 3); refuses unreadable, 1 frame, mixed sizes, too many, too large
        except UserError as e:
            raise BadRequest(_plain(str(e), root, "the zip")) from None
        if shape is None:
            shape = (rel, frames.shape[1:3])
        elif frames.shape[1:3] != shape[1]:
            (h0, w0), (h, w) = shape[1], frames.shape[1:3]
            raise BadRequest(f"the clips differ in size: {shape[0]} is {w0}x{h0} but {rel} is {w}x{h}; make them all "
                             f"one size")
        lengths[rel] = len(frames)
        gray = gray and bool((frames[..., 0] == frames[..., 1]).all() and (frames[..., 0] == frames[..., 2]).all())
        del frames
    default = VideoDataConfig()
    # the longest clip, at most the default length, that every file holds and that makes two clips (one held out)
    frames = next((n for n in range(min(default.frames, min(lengths.values())), 1, -1)
                   if sum(k // n for k in lengths.values()) >= 2), None)
    if frames is None:
        raise BadRequest(f"{sum(lengths.values())} frames in all are too few for two clips of 2 frames (training "
                         f"holds one out): upload a longer clip or more files")
    summary = {"files": len(files), "frames": [min(lengths.values()), max(lengths.values())],
               "size": [int(shape[1][1]), int(shape[1][0])], "channels": 1 if gray else 3, "classes": class_names}
    if class_names:
        summary["class_counts"] = {c: sum(r.split("/")[0] == c for r in rels) for c in class_names}
    if frames < default.frames:  # the defaults would refuse these files: what `aigc train --set` needs for them
        summary["train_sets"] = {"frames": str(frames)}
        if frames <= default.context:
            summary["train_sets"]["context"] = str(frames // 2)
    return name, summary


def _clip_suffix(head: bytes) -> str | None:
    """The suffix of a clip file by its first 12 bytes (GIF, MP4 and its ISO-media kin, AVI), None for another."""
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if head[4:8] == b"ftyp":
        return ".mp4"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return ".avi"
    return None


def _check_image_files(out: Path) -> None:
    """Every file unpacked is an image PIL can open, and all have one size (what load_images needs), said in
    words a person who made the zip understands."""
    from PIL import Image

    sizes = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        try:
            with Image.open(path) as img:
                sizes[path.relative_to(out).as_posix()] = img.size
        except (OSError, SyntaxError, ValueError):
            sizes[path.relative_to(out).as_posix()] = None
    broken = [rel for rel, size in sizes.items() if size is None]
    if len(broken) == len(sizes):
        raise BadRequest(f"no images in the zip ({_IMAGE_NAMES})")
    if broken:
        others = f" (nor are {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise BadRequest(f"{broken[0]} in the zip is not an image that can be opened{others}: remove or replace it")
    first, first_size = next(iter(sizes.items()))
    for rel, size in sizes.items():
        if size != first_size:
            raise BadRequest(f"the images differ in size: {first} is {first_size[0]}x{first_size[1]} but {rel} is "
                             f"{size[0]}x{size[1]}; resize them all to one size")


def _folder_name(upload: Upload, default: str) -> str:
    name = _safe_stem(upload.filename, default)
    return default if name in (RECORD, _RAW) else name


def _unzip(upload: Upload, out: Path, extensions: tuple[str, ...], not_zip: str, none: str) -> None:
    """Unpack the upload's zip (its files with `extensions`) into `out`, then delete the zip; `not_zip`: the error
    for a file that is no zip, `none`: for a zip without such files."""
    raw = upload.folder / _RAW
    try:
        archive = zipfile.ZipFile(raw)
    except (zipfile.BadZipFile, OSError):
        raise BadRequest(not_zip) from None
    with archive:
        members = _zip_members(archive, upload.max_bytes, extensions, none)
        _extract(archive, members, out, upload.max_bytes)
    raw.unlink()


def _zip_members(archive: zipfile.ZipFile, max_bytes: int, extensions: tuple[str, ...],
                 none: str) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The zip's files with `extensions` (images, MIDI files, sounds, clips) and where each goes, after refusing paths
    that lead outside the folder, a zip that unpacks to more than ZIP_RATIO x max_bytes, and encrypted files. One
    folder that holds everything (how most zips are made) is unwrapped, so that its sub-folders are the classes."""
    infos = archive.infolist()
    for info in infos:
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.filename.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", info.filename) or ".." in parts:
            raise BadRequest(f"the zip holds a path that leads outside its folder ({info.filename}): refusing it")
    unpacked = sum(info.file_size for info in infos)
    if unpacked > ZIP_RATIO * max_bytes:
        raise BadRequest(f"the zip unpacks to {_mb(unpacked)} MB, more than {ZIP_RATIO} times the upload limit "
                         f"({_mb(max_bytes)} MB): refusing it")
    members = []
    for info in infos:
        path = PurePosixPath(info.filename.replace("\\", "/"))
        hidden = any(part.startswith(".") or part == "__MACOSX" for part in path.parts)
        if info.is_dir() or hidden or path.suffix.lower() not in extensions:
            continue
        if info.flag_bits & 0x1:
            raise BadRequest(f"the zip is password-protected ({info.filename}): upload a zip without a password")
        members.append((info, path))
    if not members:
        raise BadRequest(none)
    tops = {path.parts[0] for _, path in members}
    if len(tops) == 1 and all(len(path.parts) > 1 for _, path in members):
        members = [(info, PurePosixPath(*path.parts[1:])) for info, path in members]
    return members


def _extract(archive: zipfile.ZipFile, members: list[tuple[zipfile.ZipInfo, PurePosixPath]], out: Path,
             max_bytes: int) -> None:
    """Write the members below `out`, counting the bytes really unpacked (a zip's sizes can lie)."""
    budget = ZIP_RATIO * max_bytes
    out.mkdir()
    for info, rel in members:
        target = out.joinpath(*rel.parts)
        if not target.resolve().is_relative_to(out.resolve()):
            raise BadRequest(f"the zip holds a path that leads outside its folder ({info.filename}): refusing it")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with archive.open(info) as src, open(target, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    budget -= len(block)
                    if budget < 0:
                        raise BadRequest(f"the zip unpacks to more than {ZIP_RATIO} times the upload limit "
                                         f"({_mb(max_bytes)} MB): refusing it")
                    dst.write(block)
        except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError, RuntimeError) as e:
            raise BadRequest(f"the zip is damaged or uses an unsupported compression ({info.filename}: {e})") from None


def _check_text_bytes(data: bytes, what: str) -> None:
    if b"\x00" in data:
        raise BadRequest(f"this looks like a binary file, not {what}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"this looks like a binary file, not {what}") from None


def _plain(message: str, folder: Path, name: str) -> str:
    """A loader's message without the server's paths: the upload's folder becomes `name`."""
    return message.replace(f"{folder}{os.sep}", "").replace(str(folder), name)


def _safe_stem(filename: str, default: str) -> str:
    """The file name's stem in letters, digits, '.', '_' and '-' (a run's default name is made of it)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(filename).stem).strip("-.")
    return stem[:100] or default


def _mb(n: int) -> str:
    return f"{n / 2**20:.3g}"


def _new_id(prefix: str) -> str:
    """prefix-<20 hex digits>: the time in microseconds, then random (ids sort by creation)."""
    return f"{prefix}-{time.time_ns() // 1000:014x}{secrets.token_hex(3)}"


def _sweep_partials(root: Path) -> None:
    for path in root.glob(f"{_PARTIAL}*"):
        try:
            if time.time() - path.stat().st_mtime > PARTIAL_MAX_AGE_S:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            pass
