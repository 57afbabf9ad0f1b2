"""Grammar-constrained sampling of the music tokens: a logits processor that lets a model draw only tokens that keep
its piece well formed and possible for its data.

The grammar is the encoding's (aigc.data.music.encode), written as what may follow each kind of token:

    (document start) -> TS                  a piece opens with its time signature
    TS               -> Bar
    Bar              -> Bar | Pos_q                         (q < the bar's length, room at q)
    Pos_p            -> Pitch_n                             (room at p: a Pos is never empty)
    Pitch_n          -> Dur_d                               (a note is always Pitch Dur; no Bar or Pos between)
    Dur_d            -> Pitch_m (m > n, room) | Pos_q (p < q < bar length, room) | Bar | end of piece
    (end of piece)   -> end of piece

so a position only moves forward within a bar (a new Bar starts again at 0), the notes of an onset come lowest first
and each pitch once, and no note is left without its duration. "Room" is the data's: at most `max_onsets` notes start
at one position and at most `max_polyphony` sound at once, both the most that any training piece has (`limits_of`,
stored in the run), so a four-part chorale run never stacks a fifth voice, and a run on piano music keeps its chords.
Our encoding has no velocity tokens (aigc.data.music: a fixed REMI-like vocabulary, not miditok's), so a note is two
tokens.

A row whose allowed tokens all have probability zero under the model (an n-gram may give -inf), or whose prompt
leaves nothing allowed, is left as the model has it: the processor narrows, it never makes the draw impossible.
The held-out likelihood is the model's and does not change; only what is sampled does.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor

from aigc.data import music as m

END = "end"  # the row has ended its piece (an end-of-text after its first token)


def limits_of(pieces: list[m.Piece]) -> dict[str, int]:
    """The most notes that start at one position (`max_onsets`) and that sound at one time (`max_polyphony`) in any
    of the pieces, as `decode` reads their tokens (one note per pitch at a time)."""
    most_onsets, most_sounding = 1, 1
    for piece in pieces:
        starts: dict[int, int] = {}
        changes: dict[int, int] = {}
        for onset, dur, _ in piece.notes:
            starts[onset] = starts.get(onset, 0) + 1
            changes[onset] = changes.get(onset, 0) + 1
            changes[onset + dur] = changes.get(onset + dur, 0) - 1
        sounding = 0
        for time in sorted(changes):  # a note ending at t and one starting at t do not overlap
            sounding += changes[time]
            most_sounding = max(most_sounding, sounding)
        most_onsets = max(most_onsets, *starts.values()) if starts else most_onsets
    return {"max_onsets": most_onsets, "max_polyphony": most_sounding}


class _Row:
    """Where one row stands in the grammar, after the tokens it has so far."""

    def __init__(self):
        self.phase = "start"  # start | ts | bar | pos | pitch | dur | end
        self.bar_len = 16
        self.bar = -1  # bars begun
        self.pos = -1  # the current onset's position in the bar
        self.onsets = 0  # notes started at the current onset
        self.last_pitch = 0  # the current onset's highest pitch so far (0: none yet)
        self.ends: list[int] = []  # when each earlier onset's notes stop sounding (16ths from the piece's start)
        self.current: list[int] = []  # the same for the current onset's notes

    @property
    def now(self) -> int:
        return max(self.bar, 0) * self.bar_len + self.pos


class RemiGrammar(LogitsProcessor):
    """Masks, per row and step, every token the grammar above does not allow next (the module's docstring). One
    instance per request: it reads each row's tokens as the decoder appends them (`input_ids` grows by one column
    a call; the first call reads the prompt, end-of-text first)."""

    def __init__(self, limits: dict[str, int]):
        self.max_onsets, self.max_polyphony = int(limits["max_onsets"]), int(limits["max_polyphony"])
        vocab = m.vocabulary()
        index = {token: i for i, token in enumerate(vocab)}
        self.vocab_size = len(vocab)
        self.eot, self.bar = index[m.EOT], index["Bar"]
        self.ts = {index[f"TS_{ts}"]: m.bar_length(ts) for ts in m.TIME_SIGNATURES}
        self.ts_ids = np.array(sorted(self.ts))
        self.pos0, self.pitch0, self.dur0 = index["Pos_0"], index[f"Pitch_{m.PITCH_RANGE[0]}"], index["Dur_1"]
        self.low, self.high = m.PITCH_RANGE
        self.rows: list[_Row] = []
        self.read = 0  # columns of input_ids already read

    # -- reading the tokens

    def feed(self, row: _Row, token: int) -> None:
        """Move `row` past `token` (an ill-formed prompt is read as `decode` would read it, without failing)."""
        if token == self.eot:
            row.phase = "start" if row.phase == "start" else END
        elif token in self.ts:
            row.bar_len, row.bar, row.phase = self.ts[token], -1, "ts"
        elif token == self.bar:
            row.ends += row.current
            row.current, row.bar, row.pos, row.phase = [], row.bar + 1, -1, "bar"
        elif self.pos0 <= token < self.pos0 + m.MAX_BAR:
            row.ends = [e for e in row.ends + row.current if e > max(row.bar, 0) * row.bar_len + token - self.pos0]
            row.current, row.pos, row.onsets, row.last_pitch, row.phase = [], token - self.pos0, 0, 0, "pos"
        elif self.pitch0 <= token < self.dur0:
            row.onsets, row.last_pitch, row.phase = row.onsets + 1, token - self.pitch0 + self.low, "pitch"
        elif token >= self.dur0:
            if row.phase == "pitch":
                row.current.append(row.now + token - self.dur0 + 1)
            row.phase = "dur"

    def allowed(self, row: _Row) -> np.ndarray:
        """(V,) True where a token may come next."""
        ok = np.zeros(self.vocab_size, dtype=bool)
        if row.phase == "start":
            ok[self.ts_ids] = True
        elif row.phase == "ts":
            ok[self.bar] = True
        elif row.phase == END:
            ok[self.eot] = True
        elif row.phase == "pitch":
            ok[self.dur0:] = True
        elif row.phase == "bar":
            ok[self.bar] = True
            ok[self.pos0 + self._open_positions(row, 0)] = True
        elif row.phase in ("pos", "dur"):
            if row.onsets < self.max_onsets and self._sounding(row, row.now) + row.onsets < self.max_polyphony \
                    and row.last_pitch < self.high:
                ok[self.pitch0 + max(row.last_pitch + 1, self.low) - self.low:self.dur0] = True
            if row.phase == "dur":
                ok[[self.bar, self.eot]] = True
                ok[self.pos0 + self._open_positions(row, row.pos + 1)] = True
        return ok

    def _sounding(self, row: _Row, time: int) -> int:
        """Notes of earlier onsets still sounding at `time`."""
        return sum(e > time for e in row.ends)

    def _open_positions(self, row: _Row, first: int) -> np.ndarray:
        """Positions first..bar end where a new onset has room (fewer than max_polyphony notes sounding)."""
        q = np.arange(first, row.bar_len)
        times = max(row.bar, 0) * row.bar_len + q
        ends = np.asarray(row.ends + row.current)
        sounding = (ends[None, :] > times[:, None]).sum(1) if len(ends) else np.zeros(len(q), dtype=int)
        return q[sounding < self.max_polyphony]

    # -- the processor

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            self.rows = [_Row() for _ in range(input_ids.shape[0])]
        for row, tokens in zip(self.rows, input_ids[:, self.read:].tolist(), strict=True):
            for token in tokens:
                self.feed(row, token)
        self.read = input_ids.shape[1]
        ok = np.zeros(scores.shape, dtype=bool)  # a model's vocabulary padded beyond ours: never drawn
        ok[:, :self.vocab_size] = np.stack([self.allowed(row) for row in self.rows])
        ok = torch.from_numpy(ok).to(scores.device)
        masked = scores.masked_fill(~ok, -float("inf"))
        # a row with nothing allowed the model can draw keeps the model's own scores (the draw must stay possible)
        possible = torch.isfinite(masked).any(-1, keepdim=True)
        return torch.where(possible, masked, scores)
