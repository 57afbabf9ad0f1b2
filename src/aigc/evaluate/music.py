"""Musical statistics of pieces (notes on a 16th grid), as muspy defines them (Dong et al. 2020, "MusPy"), and
copying: the longest run of consecutive notes a piece shares with a set of training pieces.

Notes are `(onset, duration, pitch)` tuples (aigc.data.music.Note).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)  # natural minor

Note = tuple[int, int, int]


def pitch_class_entropy(notes: Sequence[Note]) -> float:
    """Shannon entropy in bits of the pitch-class histogram (note counts): 0 for one pitch class, log2 12 = 3.585
    for all twelve equally often. NaN without notes."""
    if not notes:
        return math.nan
    counts = np.array(list(Counter(p % 12 for _, _, p in notes).values()), dtype=float)
    prob = counts / counts.sum()
    return float(-(prob * np.log2(prob)).sum())


def scale_consistency(notes: Sequence[Note]) -> float:
    """The largest share of notes that lie in one major or natural-minor scale (of 24): 1 for a piece in one key."""
    if not notes:
        return math.nan
    classes = Counter(p % 12 for _, _, p in notes)
    best = max(sum(n for pc, n in classes.items() if (pc - root) % 12 in scale)
               for root in range(12) for scale in (MAJOR, MINOR))
    return best / len(notes)


def polyphony(notes: Sequence[Note]) -> float:
    """The mean number of notes sounding at a time step, over the steps where at least one sounds (a four-part
    chorale: near 4; a melody: 1)."""
    if not notes:
        return math.nan
    end = max(o + d for o, d, _ in notes)
    sounding = np.zeros(end, dtype=int)
    for onset, dur, _ in notes:
        sounding[onset:onset + dur] += 1
    busy = sounding[sounding > 0]
    return float(busy.mean())


def note_events(notes: Sequence[Note]) -> list[tuple[int, int, int]]:
    """Notes as a sequence that does not depend on where a piece starts: (pitch, duration, steps since the previous
    note's onset), in (onset, pitch) order."""
    out, previous = [], None
    for onset, dur, pitch in sorted(notes):
        out.append((pitch, dur, 0 if previous is None else onset - previous))
        previous = onset
    return out


def longest_copy(notes: Sequence[Note], training: Sequence[Sequence[Note]]) -> int:
    """The longest run of consecutive notes of `notes` (as `note_events`, the first note's gap ignored) that also
    occurs in one of the `training` pieces. Binary search on the length: a run of k shared notes contains one of
    every shorter length."""
    events = [e[:2] + ((0,) if i == 0 else e[2:]) for i, e in enumerate(note_events(notes))]
    corpus = [note_events(piece) for piece in training]

    def shared(k: int) -> bool:
        windows = set()
        for piece in corpus:
            for i in range(len(piece) - k + 1):
                window = piece[i:i + k]
                windows.add((window[0][:2],) + tuple(window[1:]))
        return any(((events[i][:2],) + tuple(events[i + 1:i + k])) in windows for i in range(len(events) - k + 1))

    low, high = 0, len(events)
    while low < high:  # the largest k with shared(k)
        mid = (low + high + 1) // 2
        if shared(mid):
            low = mid
        else:
            high = mid - 1
    return low


def music_statistics(pieces: Sequence[Sequence[Note]]) -> dict[str, float]:
    """The mean of each statistic over pieces that have notes."""
    pieces = [p for p in pieces if p]
    if not pieces:
        return {"pitch_class_entropy": math.nan, "scale_consistency": math.nan, "polyphony": math.nan}
    return {"pitch_class_entropy": float(np.mean([pitch_class_entropy(p) for p in pieces])),
            "scale_consistency": float(np.mean([scale_consistency(p) for p in pieces])),
            "polyphony": float(np.mean([polyphony(p) for p in pieces]))}
