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
and each pitch once (and, since grammar version 2, not while a note of that pitch still sounds: decoding would cut that
note short), and no note is left without its duration. "Room" is the data's: at most `max_onsets` notes start
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
# 2: a pitch still sounding is not struck again (decoding keeps one note per pitch at a time, so the new note would
# cut the held one short: a kept opening's note, say); 1: as pieces were sampled before 2026-12-07 (their replays)
GRAMMAR_VERSION = 2


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
        self.held: dict[int, int] = {}  # pitch -> when its latest note stops sounding

    @property
    def now(self) -> int:
        return max(self.bar, 0) * self.bar_len + self.pos


class RemiGrammar(LogitsProcessor):
    """Masks, per row and step, every token the grammar above does not allow next (the module's docstring). One
    instance per request: it reads each row's tokens as the decoder appends them (`input_ids` grows by one column
    a call; the first call reads the prompt, end-of-text first)."""

    def __init__(self, limits: dict[str, int]):
        self.max_onsets, self.max_polyphony = int(limits["max_onsets"]), int(limits["max_polyphony"])
        self.version = int(limits.get("version", GRAMMAR_VERSION))
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
                row.held[row.last_pitch] = row.now + token - self.dur0 + 1
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
                ok[self.pitch0 + self._struck_again(row) - self.low] = False
            if row.phase == "dur":
                ok[[self.bar, self.eot]] = True
                ok[self.pos0 + self._open_positions(row, row.pos + 1)] = True
        return ok

    def _struck_again(self, row: _Row) -> np.ndarray:
        """The pitches a note at the row's onset may not have: those still sounding (since version 2; none before)."""
        if self.version < 2:
            return np.zeros(0, dtype=int)
        return np.array([p for p, end in row.held.items() if end > row.now], dtype=int)

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
            self.rows = [self.new_row() for _ in range(input_ids.shape[0])]
        for row, tokens in zip(self.rows, input_ids[:, self.read:].tolist(), strict=True):
            for token in tokens:
                self.feed(row, token)
        self.read = input_ids.shape[1]
        ok = np.zeros(scores.shape, dtype=bool)  # a model's vocabulary padded beyond ours: never drawn
        ok[:, :self.vocab_size] = np.stack([self.allowed(row) for row in self.rows])
        ok = torch.from_numpy(ok).to(scores.device)
        masked = scores.masked_fill(~ok, -float("inf"))
        # a row with nothing allowed the model can draw keeps the model's own scores (the draw must stay possible);
        # a strict grammar (a melody to keep) draws evenly among what it allows instead
        possible = torch.isfinite(masked).any(-1, keepdim=True)
        fallback = torch.zeros_like(scores).masked_fill(~ok, -float("inf")) if self.strict else scores
        return torch.where(possible, masked, fallback)

    strict = False  # a row with nothing allowed that the model can draw: the model's scores (False) or the mask's

    def new_row(self) -> _Row:
        return _Row()


# ----------------------------------------------------------------------------------
# harmonisation: a melody kept as the top voice, the model writes the voices below it


class _HarmonyRow(_Row):
    def __init__(self):
        super().__init__()
        self.next = 0  # the melody's notes emitted so far (the index of the next one)
        self.melody_note = False  # the Pitch just read is the melody's (its Dur is forced)
        self.lower: list[int] = []  # when each lower note stops sounding (16ths from the piece's start)
        self.logp: np.ndarray | None = None  # (V,) the model's log-probabilities at the last step (before the mask)
        self.melody_logp = 0.0  # the model's log-probability of the melody's tokens, given what came before each


class HarmonyGrammar(RemiGrammar):
    """The grammar above, and a melody kept exactly as the piece's top voice (harmonisation, as DeepBach does: given
    a soprano, the model writes the voices below it). With the melody's notes (onset, duration, pitch; one at a
    time, `aigc.data.music.soprano_line`) on its time signature:

        (document start) -> TS of the melody
        at a melody onset t: Pos_t is the only position that may follow once the piece reaches t's bar (no onset
            after t before it, no Bar past it, no end while notes of the melody are left); at Pos_t the lower notes
            (pitch below the melody's) come first, as the encoding orders an onset's notes lowest first, then the
            melody's Pitch_p Dur_d, forced; nothing after it at that onset (the melody is the top note)
        every other note: its pitch below the melody's at every step it sounds (`ceiling`: the melody note sounding
            then; in a rest of the melody, its previous note), so its duration is cut where the melody falls to or
            below it; nothing sounds before the melody's first note begins or after its last note ends
        room: at most max_onsets - 1 lower notes at a melody onset and max_polyphony - 1 lower notes sounding at
            once, so the melody always fits the run's limits

    and the token budget (`budget`: the tokens after the document's start, the request's max_new_tokens, as a
    harmonisation has no other prompt) is kept for the melody: a lower note, an onset or
    a bar of lower voices alone is allowed only while the tokens left cover it and every melody note still to come
    (`needed`), so a piece never runs out before its melody ends. Strict: a row whose allowed tokens the model all
    gives zero probability draws evenly among them (the melody is never given up for the model's scores).

    `until` k: a row ends (end of text) as soon as it has the melody's first k notes whole, so a harmonisation can be
    written onset by onset (aigc.modalities.music: each onset's candidates, the piece so far as their prompt)."""

    strict = True

    def __init__(self, limits: dict[str, int], melody: m.Piece, budget: int, until: int | None = None):
        super().__init__(limits)
        self.until = until  # end each row once it has this many of the melody's notes (None: at the piece's end)
        if not melody.notes:
            raise ValueError("the melody has no notes")
        self.bar_len = m.bar_length(melody.time_signature)
        self.ts_id = m.vocabulary().index(f"TS_{melody.time_signature}")
        self.melody = sorted(melody.notes)
        self.onsets = [onset for onset, _, _ in self.melody]
        self.end = max(onset + dur for onset, dur, _ in self.melody)  # nothing sounds after the melody's end
        # (end,) the pitch every lower note stays below: 0 (none) before the melody begins
        self.ceiling = np.zeros(self.end, dtype=int)
        for onset, _, pitch in self.melody:
            self.ceiling[onset:] = pitch  # sounding from its onset, and through the rest after it
        self.budget = budget

    def new_row(self) -> _HarmonyRow:
        return _HarmonyRow()

    def minimum(self) -> int:
        """The fewest tokens a piece with this melody takes (the melody alone, the end of text included)."""
        return self.needed(_HarmonyRow())

    def needed(self, row: _HarmonyRow) -> int:
        """Tokens still to come on the shortest way from the row's state to the piece's end: the melody's notes
        left (Pos Pitch Dur, or Pitch Dur at the position the row is at), the Bars before them, the end of text."""
        n = {"start": 2, "ts": 1, "pitch": 1}.get(row.phase, 0)  # TS and Bar; the Dur of the note begun
        bar = row.bar
        for onset in self.onsets[row.next:]:
            n += onset // self.bar_len - bar
            n += 2 if onset == row.now and onset // self.bar_len == bar and row.phase in ("pos", "dur") else 3
            bar = onset // self.bar_len
        return n + 1

    def feed(self, row: _HarmonyRow, token: int) -> None:
        melody_pitch = row.next < len(self.melody) and self.melody[row.next][0] == row.now and \
            row.phase in ("pos", "dur") and token == self.pitch0 + self.melody[row.next][2] - self.low
        lower_dur = row.phase == "pitch" and not row.melody_note and token >= self.dur0
        if row.logp is not None and (melody_pitch or (row.melody_note and token >= self.dur0)):
            row.melody_logp += float(row.logp[token])
        super().feed(row, token)
        if melody_pitch:
            row.next, row.melody_note = row.next + 1, True
        elif lower_dur:
            row.lower.append(row.now + token - self.dur0 + 1)
        elif token >= self.dur0 or token < self.pitch0:
            row.melody_note = False

    def allowed(self, row: _HarmonyRow) -> np.ndarray:
        ok = np.zeros(self.vocab_size, dtype=bool)
        left = self.budget - self.generated - self.needed(row)  # tokens to spare for the lower voices
        if row.phase == "start":
            ok[self.ts_id] = True
        elif row.phase == "ts":
            ok[self.bar] = True
        elif row.phase == END or (self.until is not None and row.next >= self.until and row.phase == "dur"):
            ok[self.eot] = True
        elif row.phase == "pitch":
            if row.melody_note:
                ok[self.dur0 + self.melody[row.next - 1][1] - 1] = True
            else:
                ok[self.dur0:self.dur0 + self._longest(row.now, row.last_pitch)] = True
        elif row.phase == "bar":
            self._onward(row, 0, left, ok)
        else:  # pos | dur
            at_melody = row.next < len(self.melody) and self.onsets[row.next] == row.now
            if at_melody:
                ok[self.pitch0 + self.melody[row.next][2] - self.low] = True
            if left >= 2 and row.now < self.end and row.onsets < self.max_onsets - int(at_melody) and \
                    self._lower_sounding(row, row.now) < self.max_polyphony - 1:
                first = max(row.last_pitch + 1, self.low)
                ok[self.pitch0 + first - self.low:self.pitch0 + self.ceiling[row.now] - self.low] = True
                struck = self._struck_again(row)  # as RemiGrammar's, among the lower voices' pitches
                ok[self.pitch0 + struck[struck < self.ceiling[row.now]] - self.low] = False
            if row.phase == "dur" and not at_melody:
                self._onward(row, row.pos + 1, left, ok)
        return ok

    def _onward(self, row: _HarmonyRow, first: int, left: int, ok: np.ndarray) -> None:
        """What may follow a bar line or a whole onset: a position from `first` on (the next melody onset's if it is
        in this bar, or one of the lower voices alone before it), a Bar, or the end once the melody is all there."""
        start = row.bar * self.bar_len
        melody_next = self.onsets[row.next] if row.next < len(self.onsets) else None
        stop = min(start + self.bar_len, self.end, self.end if melody_next is None else melody_next)
        if melody_next is not None and melody_next < start + self.bar_len:
            ok[self.pos0 + melody_next - start] = True
        if left >= 3:  # an onset of the lower voices alone: a Pos and at least one note
            for time in range(start + first, stop):
                if self.ceiling[time] > self.low and self._lower_sounding(row, time) < self.max_polyphony - 1:
                    ok[self.pos0 + time - start] = True
        if melody_next is not None and melody_next >= start + self.bar_len:
            ok[self.bar] = True
        if melody_next is None:
            after = start + self.bar_len  # a bar of lower voices alone: only where one of them has room at its start
            if after < self.end and left >= 4 and self.ceiling[after] > self.low and \
                    self._lower_sounding(row, after) < self.max_polyphony - 1:
                ok[self.bar] = True
            if row.phase == "dur":
                ok[self.eot] = True

    def _lower_sounding(self, row: _HarmonyRow, time: int) -> int:
        return sum(e > time for e in row.lower)

    def _longest(self, time: int, pitch: int) -> int:
        """The longest a lower note of `pitch` starting at `time` may last: until the melody falls to or below it,
        or ends."""
        below = np.nonzero(self.ceiling[time:] <= pitch)[0]
        return int(min(below[0] if len(below) else self.end - time, m.MAX_DUR))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.generated = input_ids.shape[1] - 1  # tokens after the document's start (a harmonisation's prompt)
        out = super().__call__(input_ids, scores)
        logp = torch.log_softmax(scores.float(), -1)[:, :self.vocab_size].cpu().numpy()  # the model's own
        for row, row_logp in zip(self.rows, logp, strict=True):
            row.logp = row_logp
        return out

    def melody_scores(self) -> list[float]:
        """Per row: the model's log-probability of the melody's tokens (its Pitch and Dur at each onset) given the
        piece before each, as the model scored them before the mask: how well the lower voices it wrote foresee the
        melody (a harmonisation in another key than the melody's makes it improbable)."""
        return [row.melody_logp for row in self.rows]
