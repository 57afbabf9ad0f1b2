"""Symbolic music for the text families: pieces as notes, notes as event tokens, tokens as ids.

A piece is a list of notes `(onset, duration, pitch)` on a 16th-note grid (integers: onset and duration in 16ths,
pitch a MIDI number). The encoding is REMI-like (Huang & Yang 2020, "Pop Music Transformer"): per piece a time
signature token, then per bar `Bar`, and per onset in the bar `Pos_p` followed by `Pitch_n Dur_d` for each note
that starts there (lowest pitch first). The vocabulary is fixed (it does not depend on the data) and is a
`tokenizers` WordLevel tokenizer, so a music run's tokenizer.json loads like a text run's and the text families,
their training loop and their decoding take music unchanged: the data path is token ids.

Why this and not miditok's REMI: the same idea, but a fixed vocabulary of 213 words and no second MIDI stack
(miditok reads through symusic; music21 already parses the corpus, and a 60-line reader gives MIDI notes their own
durations, which music21's MIDI import merges into chords), and a round trip that is exact by construction at
16ths (tests/test_music.py). Durations above MAX_DUR 16ths are clipped to it; pitches outside the
piano range and notes shorter than a 32nd (grace notes) are dropped.

Data: `bach-chorales` (the chorales in the music21 wheel's corpus: four-part ones, exact copies removed, split by
chorale), a .mid/.midi file, or a folder of them. Parsing the corpus takes about a minute: the encoded pieces are
cached under the cache dir, keyed by music21's version, the encoding's version and the corpus files.

Output: a standard MIDI file with the generation record as a text event, a WAV (fluidsynth with a General MIDI
soundfont when both are installed, else additive sine synthesis with an ADSR envelope) and a piano-roll PNG.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin
from tokenizers import Tokenizer, models, pre_tokenizers

from aigc.config import option
from aigc.data.text import EOT
from aigc.data.tokenizer import TextTokenizer
from aigc.errors import BadRequest, NotFound
from aigc.fsutil import atomic_write_bytes, atomic_write_text
from aigc.store import cache_dir

ENCODING_VERSION = 2  # bump when the tokens of a piece change: the corpus cache is keyed by it
STEPS_PER_QUARTER = 4  # the grid: 16th notes
MAX_DUR = 64  # 16ths (four 4/4 bars)
MAX_BAR = 48  # 16ths in the longest bar the vocabulary has positions for (12/8, 6/2 ...)
PITCH_RANGE = (21, 108)  # the piano's keys
TIME_SIGNATURES = ("4/4", "3/4", "2/4", "2/2", "3/2", "6/8", "9/8", "12/8", "3/8", "6/4", "5/4")
MIDI_EXTENSIONS = (".mid", ".midi")
TICKS_PER_QUARTER = 480
VELOCITY = 80
TEMPO_BPM = 90  # what a written piece plays at (chorales carry no tempo)
SAMPLE_RATE = 22050
SOUNDFONTS = ("/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/share/sounds/sf2/FluidR3_GM.sf2",
              "/usr/share/sounds/sf2/default-GM.sf2")

Note = tuple[int, int, int]  # (onset, duration, pitch): onset and duration in 16ths, pitch a MIDI number


@dataclass
class MusicDataConfig:
    val_fraction: float = option(0.1, "share of the pieces held out for validation (whole pieces, after exact copies "
                                      "are removed)", min=0.0, max=0.5, min_exclusive=True)
    split_seed: int = option(0, "seed of the shuffle that splits the pieces", min=0)
    transpose: int = option(0, "augment the training split (only) with every transposition of -N..+N semitones "
                               "that stays on the piano (0 = off)", min=0, max=6)


@dataclass
class Piece:
    name: str  # where it came from: "bwv269", a file name
    time_signature: str  # "4/4"
    notes: list[Note]  # sorted by (onset, pitch)


@dataclass(frozen=True)
class NamedMusic:
    name: str
    package: str  # where it comes from
    licence: str
    description: str


MUSIC_CORPORA = {
    "bach-chorales": NamedMusic(
        "bach-chorales", "music21 (pip)", "public domain scores; music21 corpus (BSD-3)",
        "J. S. Bach's four-part chorales from the music21 corpus, exact copies removed"),
    "folk-abc": NamedMusic(
        "folk-abc", "music21 (pip)", "NON-COMMERCIAL USE ONLY (Essen collection, by permission)",
        "the Essen folk-song collection (melodies, ABC) from the music21 corpus, exact copies removed"),
}


# ----------------------------------------------------------------------------------
# the vocabulary and the encoding


def vocabulary() -> list[str]:
    """Every token, in id order (the end-of-text token first, as in every text vocabulary)."""
    return [EOT, "Bar", *(f"TS_{ts}" for ts in TIME_SIGNATURES), *(f"Pos_{p}" for p in range(MAX_BAR)),
            *(f"Pitch_{n}" for n in range(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
            *(f"Dur_{d}" for d in range(1, MAX_DUR + 1))]


def music_tokenizer() -> TextTokenizer:
    """The fixed vocabulary as a WordLevel tokenizer: tokens are words separated by spaces (decoding joins them
    with spaces, tokenizers' default), so a token string is readable and a prompt is a token string."""
    vocab = {token: i for i, token in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOT))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOT])
    return TextTokenizer(tok, "music")


def bar_length(time_signature: str) -> int:
    """16ths in a bar of `time_signature` ("3/4" -> 12)."""
    num, den = (int(x) for x in time_signature.split("/"))
    return num * 16 // den


def encode(piece: Piece) -> list[str]:
    """The piece's tokens: TS, then Bar per bar (empty bars too), Pos before each onset, Pitch Dur per note."""
    bar = bar_length(piece.time_signature)
    tokens = [f"TS_{piece.time_signature}"]
    by_onset: dict[int, list[Note]] = {}
    for note in piece.notes:
        by_onset.setdefault(note[0], []).append(note)
    last_bar = max((onset // bar for onset in by_onset), default=-1)
    onsets = sorted(by_onset)
    i = 0
    for b in range(last_bar + 1):
        tokens.append("Bar")
        while i < len(onsets) and onsets[i] // bar == b:
            tokens.append(f"Pos_{onsets[i] - b * bar}")
            for _, dur, pitch in sorted(by_onset[onsets[i]], key=lambda n: n[2]):
                tokens += [f"Pitch_{pitch}", f"Dur_{dur}"]
            i += 1
    return tokens


def decode(tokens: list[str], name: str = "generated") -> Piece:
    """The notes of a token sequence. Generated sequences need not be well formed: a Pitch without a Dur after it,
    a position past the bar's end and tokens before the first Bar are skipped."""
    time_signature, notes = _read_notes(tokens)
    return Piece(name, time_signature, one_voice_per_pitch(notes))


def notes_as_written(tokens: list[str]) -> list[Note]:
    """The notes the tokens write, each whole (`decode` then keeps one note per pitch at a time)."""
    return _read_notes(tokens)[1]


def _read_notes(tokens: list[str]) -> tuple[str, list[Note]]:
    time_signature, bar, b, pos = "4/4", 16, -1, None
    notes: list[Note] = []
    for i, token in enumerate(tokens):
        kind, _, value = token.partition("_")
        if kind == "TS" and b < 0 and value in TIME_SIGNATURES:
            time_signature, bar = value, bar_length(value)
        elif kind == "Bar":
            b, pos = b + 1, None
        elif kind == "Pos" and b >= 0:
            pos = int(value) if int(value) < bar else None
        elif kind == "Pitch" and pos is not None and i + 1 < len(tokens) and tokens[i + 1].startswith("Dur_"):
            notes.append((b * bar + pos, int(tokens[i + 1][4:]), int(value)))
    return time_signature, notes


def bars_of(tokens: list[str]) -> int:
    return sum(t == "Bar" for t in tokens)


def first_bars(tokens: list[str], bars: int) -> list[str]:
    """The tokens up to the end of bar `bars` (the next Bar token excluded)."""
    seen = 0
    for i, token in enumerate(tokens):
        if token == "Bar":
            seen += 1
            if seen > bars:
                return tokens[:i]
    return tokens


def quantize(notes: list[tuple[float, float, int]], shift: float = 0.0) -> list[Note]:
    """Notes in quarter lengths -> the grid (16ths); durations clipped to MAX_DUR, pitches outside the piano and
    grace notes dropped, then `one_voice_per_pitch`."""
    out = []
    for offset, length, pitch in notes:
        dur = round(length * STEPS_PER_QUARTER)
        if dur < 1 or not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
            continue
        out.append((round((offset + shift) * STEPS_PER_QUARTER), min(dur, MAX_DUR), int(pitch)))
    return one_voice_per_pitch(out)


def one_voice_per_pitch(notes: list[Note]) -> list[Note]:
    """At most one note of a pitch sounds at a time, as on one MIDI channel: of notes of a pitch that start
    together the longest is kept, and a note is cut where the next note of its pitch starts (two voices in
    unison are one key held)."""
    longest: dict[tuple[int, int], int] = {}
    for onset, dur, pitch in notes:
        longest[onset, pitch] = max(dur, longest.get((onset, pitch), 0))
    out, by_pitch = [], {}
    for (onset, pitch), dur in sorted(longest.items(), key=lambda item: (item[0][1], item[0][0])):
        by_pitch.setdefault(pitch, []).append((onset, dur))
    for pitch, starts in by_pitch.items():
        for (onset, dur), following in zip(starts, [*starts[1:], None], strict=True):
            out.append((onset, dur if following is None else min(dur, following[0] - onset), pitch))
    return sorted(out)


# ----------------------------------------------------------------------------------
# reading scores and MIDI files (music21)


def piece_of_score(score, name: str) -> Piece:
    """A music21 score as a Piece: every part's notes (ties joined), a pickup bar padded to a full bar."""
    parts = score.parts if len(score.parts) else [score]
    raw = []
    for part in parts:
        for element in part.stripTies().flatten().notes:
            for pitch in element.pitches:
                raw.append((float(element.offset), float(element.quarterLength), pitch.midi))
    signatures = score.recurse().getElementsByClass("TimeSignature")
    ts = signatures[0].ratioString if len(signatures) else "4/4"
    if ts not in TIME_SIGNATURES:
        ts = "4/4"
    shift = 0.0
    measures = parts[0].getElementsByClass("Measure")
    if len(measures):
        full, first = bar_length(ts) / STEPS_PER_QUARTER, float(measures[0].duration.quarterLength)
        if 0 < first < full:  # a pickup: the first downbeat falls on a bar line
            shift = full - first
    return Piece(name, ts, quantize(raw, shift))


def soprano_line(notes: list[Note]) -> list[Note]:
    """The top voice of a piece (its skyline): at each onset the highest note that starts there, when it is above the
    top note still sounding then (which it cuts short); an onset under a held top note belongs to the lower voices.
    One note at a time: a melody read from a single part is itself."""
    highest: dict[int, Note] = {}
    for note in notes:
        if note[0] not in highest or note[2] > highest[note[0]][2]:
            highest[note[0]] = note
    line: list[Note] = []
    for onset in sorted(highest):
        _, dur, pitch = highest[onset]
        if line and line[-1][0] + line[-1][1] > onset:  # the top note so far still sounds
            if pitch <= line[-1][2]:
                continue
            line[-1] = (line[-1][0], onset - line[-1][0], line[-1][2])
        line.append((onset, dur, pitch))
    return line


def read_midi(path: Path) -> Piece:
    """One MIDI file (type 0 or 1) as a Piece: every note on every channel but the drums' (10), onsets and durations
    rounded to 16ths, the first time signature. Read by hand (`parse_midi`): music21's MIDI import merges notes that
    start together into chords of one duration, which loses the voices' own lengths. An unreadable or empty file is
    a BadRequest that names it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise NotFound(f"{path}: cannot read it ({e.strerror})") from None
    return midi_piece(data, Path(path).stem, str(path))


def midi_piece(data: bytes, name: str, what: str) -> Piece:
    """The bytes of a MIDI file as a Piece named `name`, as `read_midi` reads a file; an unreadable or empty one is
    a BadRequest that names it as `what`."""
    try:
        notes, ts = parse_midi(data)
    except (ValueError, IndexError, struct.error) as e:
        raise BadRequest(f"{what}: not a readable MIDI file ({e})") from None
    piece = Piece(name, ts if ts in TIME_SIGNATURES else "4/4", quantize(notes))
    if not piece.notes:
        raise BadRequest(f"{what}: the MIDI file has no notes")
    return piece


def parse_midi(data: bytes) -> tuple[list[tuple[float, float, int]], str]:
    """The notes of a standard MIDI file as (offset, length, pitch) in quarter notes, and its time signature."""
    if data[:4] != b"MThd":
        raise ValueError("no MThd header")
    header_len, _, n_tracks, division = struct.unpack(">IHHH", data[4:14])
    if division & 0x8000 or division == 0:
        raise ValueError("SMPTE time division is not supported")
    at, notes, ts = 8 + header_len, [], None
    for _ in range(n_tracks):
        if data[at:at + 4] != b"MTrk":
            raise ValueError(f"no MTrk chunk at byte {at}")
        length = struct.unpack(">I", data[at + 4:at + 8])[0]
        track, at = data[at + 8:at + 8 + length], at + 8 + length
        if len(track) < length:
            raise ValueError("the file ends inside a track")
        i, tick, status, sounding = 0, 0, 0, {}
        while i < len(track):
            delta, i = _read_varlen(track, i)
            tick += delta
            if track[i] & 0x80:
                status, i = track[i], i + 1
            elif not status:
                raise ValueError("running status without a status byte")
            kind = status & 0xF0
            if status == 0xFF:  # meta event
                meta, (size, i) = track[i], _read_varlen(track, i + 1)
                if meta == 0x58 and size >= 2 and ts is None:
                    ts = f"{track[i]}/{2 ** track[i + 1]}"
                i += size
            elif status in (0xF0, 0xF7):  # sysex
                size, i = _read_varlen(track, i)
                i += size
            elif kind in (0x80, 0x90):
                pitch, velocity, channel = track[i], track[i + 1], status & 0x0F
                i += 2
                if channel == 9:
                    continue
                key = (channel, pitch)
                if kind == 0x90 and velocity > 0:
                    sounding.setdefault(key, []).append(tick)
                elif sounding.get(key):
                    start = sounding[key].pop(0)
                    notes.append((start / division, (tick - start) / division, pitch))
            else:
                i += 1 if kind in (0xC0, 0xD0) else 2
    return notes, ts or "4/4"


def _read_varlen(data: bytes, i: int) -> tuple[int, int]:
    value = 0
    while True:
        byte = data[i]
        value, i = (value << 7) | (byte & 0x7F), i + 1
        if not byte & 0x80:
            return value, i


def is_music_data(spec: str) -> bool:
    """A named music corpus, a MIDI file, or a folder that holds MIDI files: the data that makes a run a music run."""
    path = Path(spec).expanduser()
    if spec in MUSIC_CORPORA or path.suffix.lower() in MIDI_EXTENSIONS:
        return True
    return path.is_dir() and any(p.suffix.lower() in MIDI_EXTENSIONS for p in path.rglob("*"))


def midi_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in MIDI_EXTENSIONS and p.is_file())


def load_music(spec: str) -> tuple[list[Piece], str]:
    """The pieces of a named corpus, a MIDI file or a folder of them, and the source as recorded."""
    if spec == "bach-chorales":
        return bach_chorales(), spec
    if spec == "folk-abc":
        return folk_tunes(), spec
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise NotFound(f"{spec}: no such file or folder (and not a named music corpus: {', '.join(MUSIC_CORPORA)})")
    files = midi_files(path) if path.is_dir() else [path]
    if not files:
        raise BadRequest(f"{spec}: the folder holds no MIDI files (.mid, .midi)")
    return [read_midi(f) for f in files], str(path)


def chorale_names() -> list[str]:
    from music21 import corpus  # noqa: PLC0415

    return list(corpus.chorales.Iterator(returnType="filename"))


def bach_chorales(limit: int | None = None) -> list[Piece]:
    """The four-part chorales of the music21 corpus (the first `limit` of them), exact copies removed (the first
    kept), encoded; cached under the cache dir by music21's version, ENCODING_VERSION and the corpus files."""
    import music21  # noqa: PLC0415
    from music21 import corpus  # noqa: PLC0415

    names = chorale_names()[:limit]
    key = hashlib.sha256(json.dumps([music21.__version__, ENCODING_VERSION, names]).encode()).hexdigest()[:16]
    path = cache_dir() / "music" / f"bach-chorales-{key}.json"
    if path.is_file():
        return _read_cached(path)
    pieces = []
    for name in names:
        score = corpus.parse(name)
        if len(score.parts) == 4:
            pieces.append(piece_of_score(score, name.split("/")[-1]))
    pieces = remove_copies(pieces)
    _write_cached(path, pieces)
    return pieces


def _read_cached(path: Path) -> list[Piece]:
    return [Piece(p["name"], p["ts"], [tuple(n) for n in p["notes"]]) for p in json.loads(path.read_text())]


def _write_cached(path: Path, pieces: list[Piece]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps([{"name": p.name, "ts": p.time_signature, "notes": p.notes} for p in pieces]))


def essen_files() -> list[Path]:
    """The ABC files of the Essen folk-song collection in music21's corpus (32 files, 8,514 tunes)."""
    import music21  # noqa: PLC0415

    return sorted((Path(music21.__file__).parent / "corpus" / "essenFolksong").glob("*.abc"))


def folk_tunes(files: list[Path] | None = None) -> list[Piece]:
    """The tunes of the Essen collection (of `files`, default every file), each parsed by music21's ABC reader and
    encoded, exact copies removed (the first kept). music21 reads ABC at about 0.1 s a tune: each file's pieces are
    cached under the cache dir (by music21's version, ENCODING_VERSION, the file's name and size), so a cold read
    is paid once. A tune music21 cannot read, or one without notes, is skipped and counted on stderr."""
    import music21  # noqa: PLC0415
    from music21 import converter  # noqa: PLC0415

    pieces, skipped = [], 0
    for path in files if files is not None else essen_files():
        key = hashlib.sha256(json.dumps([music21.__version__, ENCODING_VERSION, path.name,
                                         path.stat().st_size]).encode()).hexdigest()[:16]
        cached = cache_dir() / "music" / f"folk-abc-{path.stem}-{key}.json"
        if cached.is_file():
            pieces += _read_cached(cached)
            continue
        found = []
        opus = converter.parse(path, format="abc")
        for i, score in enumerate(getattr(opus, "scores", [opus])):
            number = score.metadata.number if score.metadata is not None and score.metadata.number else i + 1
            try:
                piece = piece_of_score(score, f"{path.stem}-{number}")
            except Exception:  # noqa: BLE001 -- music21 raises many kinds on a malformed tune: skip it, counted
                piece = None
            if piece is None or not piece.notes:
                skipped += 1
                continue
            found.append(piece)
        _write_cached(cached, found)
        pieces += found
    if skipped:
        print(f"folk-abc: {skipped} tune(s) without readable notes skipped", file=sys.stderr)
    return remove_copies(pieces)


def digest(piece: Piece) -> str:
    """A piece's identity: the sha256 of its tokens (two pieces with the same tokens are copies)."""
    return hashlib.sha256(" ".join(encode(piece)).encode()).hexdigest()


def remove_copies(pieces: list[Piece]) -> list[Piece]:
    """Pieces whose tokens are identical to an earlier one's are dropped (they would land in both splits)."""
    seen, out = set(), []
    for piece in pieces:
        digest_ = digest(piece)
        if digest_ not in seen:
            seen.add(digest_)
            out.append(piece)
    return out


def split_pieces(pieces: list[Piece], val_fraction: float, seed: int) -> tuple[list[Piece], list[Piece]]:
    """Split by piece: a seeded shuffle, the last `val_fraction` (at least one) held out."""
    if len(pieces) < 2:
        raise BadRequest(f"{len(pieces)} piece(s): a music run needs at least 2 (one to train on, one to validate)")
    order = np.random.default_rng(seed).permutation(len(pieces))
    n_val = max(1, round(len(pieces) * val_fraction))
    return [pieces[i] for i in order[:-n_val]], [pieces[i] for i in order[-n_val:]]


def transposed(pieces: list[Piece], semitones: int) -> list[Piece]:
    """Each piece and its transpositions by -semitones..+semitones (0 excluded) that keep every pitch on the
    piano: the augmentation of a training split (a validation split is never augmented)."""
    out = list(pieces)
    for shift in (s for s in range(-semitones, semitones + 1) if s):
        for piece in pieces:
            notes = [(o, d, p + shift) for o, d, p in piece.notes]
            if all(PITCH_RANGE[0] <= p <= PITCH_RANGE[1] for _, _, p in notes):
                out.append(Piece(f"{piece.name}{shift:+d}", piece.time_signature, notes))
    return out


# ----------------------------------------------------------------------------------
# writing: MIDI, WAV, piano roll


def _varlen(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def midi_bytes(piece: Piece, text: str = "") -> bytes:
    """A type-0 standard MIDI file: `text` as a text event (the generation record), tempo, time signature, and
    the notes (piano, channel 0). Written by hand: music21's writer has no place for a text event, and these are
    deterministic bytes (the same piece and record, the same file)."""
    num, den = (int(x) for x in piece.time_signature.split("/"))
    tick = TICKS_PER_QUARTER // STEPS_PER_QUARTER
    events = []  # (time, order, bytes): note-offs before note-ons at the same tick
    for onset, dur, pitch in piece.notes:
        events.append((onset * tick, 1, bytes([0x90, pitch, VELOCITY])))
        events.append(((onset + dur) * tick, 0, bytes([0x80, pitch, 0])))
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    body = b""
    if text:
        data = text.encode("utf-8")
        body += b"\x00\xff\x01" + _varlen(len(data)) + data
    body += b"\x00\xff\x51\x03" + (60_000_000 // TEMPO_BPM).to_bytes(3, "big")
    body += b"\x00\xff\x58\x04" + bytes([num, int(math.log2(den)), 24, 8])
    body += b"\x00\xc0\x00"  # program 0: acoustic grand piano
    now = 0
    for time, _, message in events:
        body += _varlen(time - now) + message
        now = time
    body += b"\x00\xff\x2f\x00"
    return (b"MThd" + struct.pack(">IHHH", 6, 0, 1, TICKS_PER_QUARTER)
            + b"MTrk" + struct.pack(">I", len(body)) + body)


def midi_text(path: Path) -> str:
    """The first text event of a MIDI file that `midi_bytes` wrote (the generation record)."""
    data = Path(path).read_bytes()
    at = data.find(b"\xff\x01")
    if at < 0:
        return ""
    length, i = _read_varlen(data, at + 2)
    return data[i:i + length].decode("utf-8")


def seconds_per_step() -> float:
    return 60.0 / TEMPO_BPM / STEPS_PER_QUARTER


def soundfont() -> Path | None:
    """A General MIDI soundfont installed by Debian (timgm6mb-soundfont, fluid-soundfont-gm), or None."""
    return next((Path(p) for p in SOUNDFONTS if Path(p).is_file()), None)


def synthesize(piece: Piece, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Plain additive synthesis, the fallback without fluidsynth: per note a fundamental and two harmonics
    (1, 1/2, 1/4) under an ADSR envelope (10 ms attack, 100 ms decay to 0.6, 80 ms release). float32 mono."""
    step = seconds_per_step()
    end = max((o + d for o, d, _ in piece.notes), default=0) * step + 0.5
    out = np.zeros(int(end * sample_rate) + 1, dtype=np.float64)
    attack, decay, sustain, release = 0.01, 0.1, 0.6, 0.08
    for onset, dur, pitch in piece.notes:
        length = dur * step
        t = np.arange(int((length + release) * sample_rate)) / sample_rate
        freq = 440.0 * 2 ** ((pitch - 69) / 12)
        tone = sum(a * np.sin(2 * np.pi * freq * k * t) for k, a in ((1, 1.0), (2, 0.5), (3, 0.25)))
        env = np.interp(t, [0, attack, attack + decay, max(length, attack + decay), length + release],
                        [0, 1, sustain, sustain, 0])
        start = int(onset * step * sample_rate)
        out[start:start + len(t)] += tone * env
    return out.astype(np.float32)


def render(piece: Piece, midi_path: Path) -> tuple[np.ndarray, int, str]:
    """Audio of a piece: (samples, rate, how). fluidsynth plays the MIDI file with a General MIDI soundfont when
    both are installed (`apt-get install fluidsynth timgm6mb-soundfont`); otherwise `synthesize`."""
    exe, sf2 = shutil.which("fluidsynth"), soundfont()
    if exe and sf2 and os.environ.get("AIGC_NO_FLUIDSYNTH") != "1":
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "out.wav"
            done = subprocess.run([exe, "-ni", "-q", "-g", "1.0", "-r", str(SAMPLE_RATE), "-F", str(wav), "-T", "wav",
                                   str(sf2), str(midi_path)], capture_output=True, timeout=300)
            if done.returncode == 0 and wav.is_file():
                samples, rate = read_wav(wav)
                return samples, rate, f"fluidsynth {sf2.name}"
    return synthesize(piece), SAMPLE_RATE, "additive sine synthesis with ADSR (fluidsynth or soundfont not found)"


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV as float32 mono in [-1, 1], and its rate."""
    with wave.open(str(path), "rb") as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
        channels, rate = w.getnchannels(), w.getframerate()
    return frames.reshape(-1, channels).mean(axis=1), rate


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """16-bit PCM mono WAV, normalised to a peak of 0.9 (silence stays silence)."""
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    scaled = samples / peak * 0.9 if peak > 0 else samples
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(scaled * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def piano_roll_png(path: Path, piece: Piece, record: dict | None = None) -> None:
    """A piano roll: time left to right (6 px per 16th, bar lines grey), pitch bottom to top (4 px per semitone,
    C lines light), with `record` as the PNG text chunk "aigc" as image runs write theirs."""
    x_px, y_px = 6, 4
    low, high = (min(p for *_, p in piece.notes) - 2, max(p for *_, p in piece.notes) + 2) if piece.notes else (48, 84)
    end = max((o + d for o, d, _ in piece.notes), default=16)
    width, height = end * x_px + 1, (high - low + 1) * y_px
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for pitch in range(low, high + 1):
        if pitch % 12 == 0:
            draw.line([(0, (high - pitch) * y_px + y_px // 2), (width, (high - pitch) * y_px + y_px // 2)],
                      fill=(235, 235, 235))
    for x in range(0, end + 1, bar_length(piece.time_signature)):
        draw.line([(x * x_px, 0), (x * x_px, height)], fill=(190, 190, 190))
    for onset, dur, pitch in piece.notes:
        y = (high - pitch) * y_px
        draw.rectangle([onset * x_px, y, (onset + dur) * x_px - 2, y + y_px - 2], fill=(30, 80, 160))
    info = PngImagePlugin.PngInfo()
    if record is not None:
        info.add_text("aigc", json.dumps(record, ensure_ascii=False))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", pnginfo=info)
    atomic_write_bytes(Path(path), buffer.getvalue())


