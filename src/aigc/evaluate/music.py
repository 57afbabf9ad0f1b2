"""Musical statistics of pieces (notes on a 16th grid) as muspy defines them (Dong et al. 2020, "MusPy"):
pitch-class entropy, scale consistency and polyphony by muspy itself, groove consistency written here (see its
docstring); their means with standard errors, and the test of issue 17's target against a floor; and copying: the
longest run of consecutive notes a piece shares with a set of training pieces, and the share of a piece's note
n-grams that occur in them.

Notes are `(onset, duration, pitch)` tuples (aigc.data.music.Note); a piece's bar length is in 16ths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Note = tuple[int, int, int]
STATISTICS = ("pitch_class_entropy", "scale_consistency", "polyphony", "groove_consistency")
STEPS_PER_QUARTER = 4  # the grid of the notes: 16ths (aigc.data.music.STEPS_PER_QUARTER)
COPY_N = 8  # the n of the copied n-grams: 8 notes, two beats of a four-part chorale


def _music(notes: Sequence[Note]):
    import muspy  # a second or two to import (matplotlib, pypianoroll): only when statistics are asked for

    track = muspy.Track(notes=[muspy.Note(time=o, pitch=p, duration=d) for o, d, p in notes])
    return muspy, muspy.Music(resolution=STEPS_PER_QUARTER, tracks=[track])


def pitch_class_entropy(notes: Sequence[Note]) -> float:
    """Shannon entropy in bits of the pitch-class histogram (note counts): 0 for one pitch class, log2 12 = 3.585
    for all twelve equally often. NaN without notes."""
    if not notes:
        return math.nan
    muspy, music = _music(notes)
    return float(muspy.pitch_class_entropy(music))


def scale_consistency(notes: Sequence[Note]) -> float:
    """The largest share of notes that lie in one major or natural-minor scale (of 24): 1 for a piece in one key."""
    if not notes:
        return math.nan
    muspy, music = _music(notes)
    return float(muspy.scale_consistency(music))


def polyphony(notes: Sequence[Note]) -> float:
    """The mean number of notes sounding at a time step, over the steps where at least one sounds (a four-part
    chorale: near 4; a melody: 1)."""
    if not notes:
        return math.nan
    muspy, music = _music(notes)
    return float(muspy.polyphony(music))


def groove_consistency(notes: Sequence[Note], bar: int = 16) -> float:
    """1 - the mean Hamming distance between the onset patterns of consecutive bars (`bar` 16ths long) over the bar
    length (Wu & Yang 2020, as muspy defines it): 1 when every bar has its onsets at the same positions. NaN for
    less than two bars. Written here, not muspy's: muspy counts `end // bar + 1` bars, so a piece that ends on a
    bar line (every chorale, every sample cut after its last full bar) gets an empty bar compared with its last
    one; here a piece has ceil(end / bar) bars, and the two agree on a piece that does not end on a bar line
    (tests/test_music.py)."""
    if not notes:
        return math.nan
    n_bars = math.ceil(max(o + d for o, d, _ in notes) / bar)
    if n_bars < 2:
        return math.nan
    onsets = np.zeros((n_bars, bar), dtype=bool)
    for onset, _, _ in notes:
        onsets[divmod(onset, bar)] = True
    return float(1 - np.count_nonzero(onsets[:-1] != onsets[1:]) / (bar * (n_bars - 1)))


def statistics_of(notes: Sequence[Note], bar: int = 16) -> dict[str, float]:
    return {"pitch_class_entropy": pitch_class_entropy(notes), "scale_consistency": scale_consistency(notes),
            "polyphony": polyphony(notes), "groove_consistency": groove_consistency(notes, bar)}


def music_statistics(pieces: Sequence[Sequence[Note]], bars: Sequence[int] | None = None) -> dict[str, float]:
    """The mean of each statistic over pieces that have notes (`bars`: each piece's bar length, default 16)."""
    return {k: v["mean"] for k, v in statistics_with_errors(pieces, bars).items()}


def statistics_with_errors(pieces: Sequence[Sequence[Note]], bars: Sequence[int] | None = None
                           ) -> dict[str, dict[str, float]]:
    """Per statistic, over the pieces that have notes (and where it is defined): mean, standard error of the mean
    (sample standard deviation / sqrt n) and n."""
    bars = list(bars) if bars is not None else [16] * len(pieces)
    rows = [statistics_of(p, b) for p, b in zip(pieces, bars, strict=True) if p]
    out = {}
    for key in STATISTICS:
        values = np.array([r[key] for r in rows if not math.isnan(r[key])], dtype=float)
        n = len(values)
        out[key] = {"mean": float(values.mean()) if n else math.nan,
                    "se": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan, "n": n}
    return out


def within_floor(samples: dict, val: dict, train: dict) -> dict[str, dict]:
    """Issue 17's test, per statistic: the samples' mean lies no farther from the validation pieces' mean than the
    training pieces' mean does (the floor), or within 2 standard errors of it (the standard error of the
    difference of the two means, sqrt(se_samples^2 + se_val^2)). Inputs: `statistics_with_errors` results."""
    out = {}
    for key in STATISTICS:
        s, v, t = samples[key], val[key], train[key]
        gap, floor = abs(s["mean"] - v["mean"]), abs(t["mean"] - v["mean"])
        se = math.sqrt(s["se"] ** 2 + v["se"] ** 2)
        out[key] = {"gap": gap, "floor": floor, "two_se": 2 * se,
                    "met": bool(gap <= floor or gap <= 2 * se)}
    return out


def note_events(notes: Sequence[Note]) -> list[tuple[int, int, int]]:
    """Notes as a sequence that does not depend on where a piece starts: (pitch, duration, steps since the previous
    note's onset), in (onset, pitch) order."""
    out, previous = [], None
    for onset, dur, pitch in sorted(notes):
        out.append((pitch, dur, 0 if previous is None else onset - previous))
        previous = onset
    return out


class CopyIndex:
    """The training pieces, indexed once to answer `longest` for many pieces: every run of SEED notes (as
    `note_events`, the first note's gap ignored) maps to where it starts, and a match found there is extended note by
    note; runs shorter than SEED are looked up in sets of their own. An evaluation asks it for every sample and every
    validation excerpt (folk-abc: ~900 pieces against ~7,500 tunes), where building the windows again for each piece
    and each length took tens of minutes."""

    SEED = 6

    def __init__(self, training: Sequence[Sequence[Note]]):
        self.corpus = [note_events(piece) for piece in training]
        self.short = [set() for _ in range(self.SEED)]  # short[k]: the runs of k notes (k < SEED)
        self.starts: dict[tuple, list[tuple[int, int]]] = {}
        for p, events in enumerate(self.corpus):
            for i in range(len(events)):
                for k in range(1, min(self.SEED, len(events) - i + 1)):
                    self.short[k].add(_run(events, i, k))
                if i + self.SEED <= len(events):
                    self.starts.setdefault(_run(events, i, self.SEED), []).append((p, i))

    def longest(self, notes: Sequence[Note]) -> int:
        """The longest run of consecutive notes of `notes` that also occurs in one of the training pieces."""
        events = note_events(notes)
        best = 0
        for i in range(len(events) - self.SEED + 1):
            for p, j in self.starts.get(_run(events, i, self.SEED), ()):
                piece, k = self.corpus[p], self.SEED
                while i + k < len(events) and j + k < len(piece) and events[i + k] == piece[j + k]:
                    k += 1
                best = max(best, k)
        if best:
            return best
        return max((k for k in range(1, self.SEED) for i in range(len(events) - k + 1)
                    if _run(events, i, k) in self.short[k]), default=0)


def _run(events: list[tuple[int, int, int]], i: int, k: int) -> tuple:
    """The k notes from events[i], the first without its gap (a run does not depend on what came before it)."""
    return (events[i][:2],) + tuple(events[i + 1:i + k])


def longest_copy(notes: Sequence[Note], training: Sequence[Sequence[Note]]) -> int:
    """The longest run of consecutive notes of `notes` (as `note_events`, the first note's gap ignored) that also
    occurs in one of the `training` pieces (for many pieces against the same training pieces: `CopyIndex`)."""
    return CopyIndex(training).longest(notes)


def note_ngrams(pieces: Sequence[Sequence[Note]], n: int = COPY_N) -> set:
    """Every run of `n` consecutive notes of the pieces (as `note_events`, the first note's gap ignored)."""
    out = set()
    for piece in pieces:
        events = note_events(piece)
        out.update(_run(events, i, n) for i in range(len(events) - n + 1))
    return out


def copied_share(notes: Sequence[Note], training_ngrams: set, n: int = COPY_N) -> float:
    """The share of the piece's runs of `n` consecutive notes that are in `training_ngrams` (`note_ngrams` of the
    training pieces, the same n). NaN for a piece of fewer than n notes."""
    events = note_events(notes)
    if len(events) < n:
        return math.nan
    runs = [_run(events, i, n) for i in range(len(events) - n + 1)]
    return sum(run in training_ngrams for run in runs) / len(runs)


# harmonisation: vertical sonorities (issue 17's stretch goal, docs/audio.md "Harmonisation")
CONSONANT_OVER_BASS = frozenset({0, 3, 4, 7, 8, 9})  # unison/octave, thirds, fifth, sixths (mod 12)
CONSONANT_UPPER = CONSONANT_OVER_BASS | {5}  # a fourth between upper voices is consonant; over the bass it is not


def sonorities(notes: Sequence[Note]) -> list[list[int]]:
    """The pitches sounding at each onset of the piece (every note with onset <= t < onset + duration), lowest
    first: its vertical sonorities, one per time a note starts."""
    onsets = sorted({o for o, _, _ in notes})
    return [sorted(p for o, d, p in notes if o <= t < o + d) for t in onsets]


def is_consonant(pitches: Sequence[int]) -> bool:
    """A sonority is consonant when every note above the bass is a unison, third, fifth, sixth or octave above it
    (compound intervals too) and every interval between two upper notes is one of those or a fourth (common-practice
    rules: a fourth over the bass is a dissonance)."""
    bass, upper = pitches[0], list(pitches[1:])
    return all((p - bass) % 12 in CONSONANT_OVER_BASS for p in upper) and \
        all((b - a) % 12 in CONSONANT_UPPER for i, a in enumerate(upper) for b in upper[i + 1:])


def consonant_share(notes: Sequence[Note]) -> float:
    """The share of the piece's sonorities of two or more notes that are consonant (`is_consonant`); NaN if none."""
    chords = [s for s in sonorities(notes) if len(s) >= 2]
    return sum(map(is_consonant, chords)) / len(chords) if chords else math.nan


def notes_per_onset(notes: Sequence[Note]) -> float:
    """The mean number of notes that start together, over the times a note starts (a chorale in block chords: 4)."""
    onsets = [o for o, _, _ in notes]
    return len(onsets) / len(set(onsets)) if onsets else math.nan


def notes_above(melody: Sequence[Note], notes: Sequence[Note]) -> list[Note]:
    """The notes, other than the melody's, that sound at or above the melody's note sounding at some step (a
    harmonisation keeps none: the melody is its top voice)."""
    top: dict[int, int] = {}
    for onset, dur, pitch in melody:
        top.update((t, pitch) for t in range(onset, onset + dur))
    kept = set(melody)
    return [n for n in notes if n not in kept and any(n[2] >= top.get(t, 1000) for t in range(n[0], n[0] + n[1]))]
