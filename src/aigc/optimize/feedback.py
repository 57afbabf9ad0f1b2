"""People's feedback on a run, read from the store as what `aigc optimize` learns from: rated outputs and
preference pairs, with the exact snapshot used (ids and a hash), so a run made from it records its lineage.

Plain Python (no torch): the checks of a request run before any model is loaded.

What counts (docs/optimize.md):
- an output's verdict is the sum of its ratings' scores (+1 good, -1 bad; a neutral rating with stars counts
  +1 for 4-5 stars and -1 for 1-2): liked when above 0, with that sum as its weight, disliked when below;
- a rating without `index` on a generation of several outputs rates each of them;
- pairs: every arena vote with a winner (left or right; ties and "both bad" say nothing about order) whose two
  sides are of the run's modality and one of them this run's, and, per prompt, every liked output of the run
  against every disliked one of the same prompt (at most MAX_PAIRS_PER_PROMPT, the strongest first; music and
  series, which have no prompt: MAX_PAIRS_UNPROMPTED, spread over the outputs).

An output is a text (the prompt and its continuation), an image (the path of its PNG, as the store keeps it), a
piece of music (its event tokens, one string), a series forecast's sample path (its values as JSON), or a clip or a
sound (its generation record as JSON: run, seed, class and sampling options, from which the run makes it again,
byte for byte); an image's, a clip's and a sound's "prompt" is its class (the class index as a string; "" for an
unconditional run), so they pair within a class as texts pair within a prompt; a piece's and a path's is "" (pieces
are judged whole, those continued from a MIDI prompt with their prompt bars).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from aigc.db import Store
from aigc.errors import BadRequest

MODALITIES = ("text", "image", "music", "series", "video", "sound")  # whose outputs feedback reads
RECORDED = ("video", "sound")  # whose outputs are their generation records (the store keeps them as the output)
MAX_PAIRS_PER_PROMPT = 16  # so one prompt rated many times does not outweigh the rest
UNPROMPTED = ("music", "series")  # whose outputs have no prompt: every rated output is in one group
# their pairs from ratings (the strongest first, then each liked output against a different disliked one before any
# against a second: diagonals of the liked x disliked grid); as many as 8 prompts of text may give
MAX_PAIRS_UNPROMPTED = 8 * MAX_PAIRS_PER_PROMPT


@dataclass(frozen=True)
class Rated:
    """One output of the run and the verdict of its ratings."""

    generation_id: str
    index: int  # which of the generation's outputs
    prompt: str  # text: the prompt; image, video, sound: the class index ("" unconditional); music, series: ""
    output: str  # text: the full text (prompt and continuation); image: the PNG's path; music: its tokens; series: the
    # path as JSON; video, sound: the clip's or the sound's record as JSON
    score: int  # the sum of the ratings' scores (see the module docstring)


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str  # outputs: full texts, both starting with the prompt, or PNG paths
    rejected: str
    source: str  # "vote" or "ratings"


@dataclass
class Feedback:
    run: str
    modality: str = "text"  # one of MODALITIES
    rated: list[Rated] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    rating_ids: list[str] = field(default_factory=list)
    vote_ids: list[str] = field(default_factory=list)

    @property
    def liked(self) -> list[Rated]:
        return [r for r in self.rated if r.score > 0]

    @property
    def disliked(self) -> list[Rated]:
        return [r for r in self.rated if r.score < 0]

    def snapshot(self) -> dict:
        """What a run made from this feedback records: the ids of the ratings and votes read and a sha256 over
        everything learned from (texts, scores, pairs), so the same store gives the same hash."""
        content = {"rated": [[r.generation_id, r.index, r.prompt, r.output, r.score] for r in self.rated],
                   "pairs": [[p.prompt, p.chosen, p.rejected, p.source] for p in self.pairs]}
        digest = hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()
        return {"run": self.run, "rating_ids": sorted(self.rating_ids), "vote_ids": sorted(self.vote_ids),
                "sha256": digest, "liked": len(self.liked), "disliked": len(self.disliked), "pairs": len(self.pairs)}


def _verdict(rating: dict) -> int:
    if rating["score"] or rating.get("stars") is None:
        return rating["score"]
    return 1 if rating["stars"] >= 4 else -1 if rating["stars"] <= 2 else 0


def _outputs(generation: dict) -> list[str]:
    """A generation's outputs as feedback reads them: its texts, its image's PNG path (one image a row), its
    pieces' token strings, its paths' JSON, or its clips' or sounds' records as JSON."""
    if generation["modality"] == "image":
        return [generation["file"]] if generation.get("file") else []
    output = generation.get("output")
    if generation["modality"] in RECORDED:
        return [json.dumps(o, sort_keys=True) for o in output if isinstance(o, dict) and "seed" in o] \
            if isinstance(output, list) else []
    if generation["modality"] == "music":
        return [o.get("tokens") or "" for o in output if isinstance(o, dict)] if isinstance(output, list) else []
    if generation["modality"] == "series":  # a forecast's sample paths, each as its JSON
        paths = output.get("paths") if isinstance(output, dict) else None
        return [json.dumps(p) for p in paths] if isinstance(paths, list) else []
    return [t for t in output if isinstance(t, str)] if isinstance(output, list) else []


def _prompt(generation: dict) -> str:
    if generation["modality"] in ("music", "series"):
        return ""
    if generation["modality"] == "image":
        label = (generation.get("output") or {}).get("class")
        return "" if label is None else str(label)
    if generation["modality"] in RECORDED:  # one class a generation (its request's)
        output = generation.get("output")
        label = output[0].get("class") if isinstance(output, list) and output and isinstance(output[0], dict) \
            else None
        return "" if label is None else str(label)
    return generation["request"].get("prompt") or ""


def _fits(modality: str, prompt: str, output: str) -> bool:
    """A text output continues its prompt (a chat reply stored without it does not); an image has its file; a
    piece has tokens."""
    return output.startswith(prompt) if modality == "text" else bool(output)


def collect(db: Store, run: str, modality: str = "text") -> Feedback:
    """The feedback stored for `run` (its name) on its outputs of `modality`, oldest generation first."""
    if modality not in MODALITIES:
        raise BadRequest(f"feedback is read for {', '.join(MODALITIES)} runs, not {modality} runs")
    feedback = Feedback(run, modality)
    generations = sorted(db.list_generations(run=run, modality=modality, limit=10**9),
                         key=lambda g: (g["created"], g["id"]))
    for gen in generations:
        outputs, prompt = _outputs(gen), _prompt(gen)
        scores: dict[int, int] = {}
        for rating in gen["ratings"]:
            feedback.rating_ids.append(rating["id"])
            for index in ([rating["index"]] if rating["index"] is not None else range(len(outputs))):
                scores[index] = scores.get(index, 0) + _verdict(rating)
        for index, score in sorted(scores.items()):
            if index < len(outputs) and _fits(modality, prompt, outputs[index]):
                feedback.rated.append(Rated(gen["id"], index, prompt, outputs[index], score))
    by_prompt: dict[str, list[Rated]] = {}
    for r in feedback.rated:
        by_prompt.setdefault(r.prompt, []).append(r)
    for prompt, rated in by_prompt.items():
        good = sorted((r for r in rated if r.score > 0), key=lambda r: -r.score)
        bad = sorted((r for r in rated if r.score < 0), key=lambda r: r.score)
        if modality in UNPROMPTED:  # one group: many pairs, each output in as many as the others (diagonals)
            pairs = [(g, b, (j - i) % len(bad), i) for i, g in enumerate(good) for j, b in enumerate(bad)]
            pairs.sort(key=lambda p: (-(p[0].score - p[1].score), p[2], p[3]))
            cap = MAX_PAIRS_UNPROMPTED
        else:
            pairs = [(g, b) for g in good for b in bad]
            pairs.sort(key=lambda gb: -(gb[0].score - gb[1].score))
            cap = MAX_PAIRS_PER_PROMPT
        feedback.pairs += [Pair(prompt, p[0].output, p[1].output, "ratings") for p in pairs[:cap]]
    for vote in db.list_votes(modality):
        if run not in (vote["left_run"], vote["right_run"]) or vote["winner"] not in ("left", "right"):
            continue
        left, right = db.get_generation(vote["left_id"]), db.get_generation(vote["right_id"])
        prompt = (vote.get("prompt") or _prompt(left)) if modality == "text" else _prompt(left)
        sides = [_outputs(left)[:1], _outputs(right)[:1]]
        if not all(sides) or not all(_fits(modality, prompt, s[0]) for s in sides):
            continue
        chosen, rejected = (sides[0][0], sides[1][0]) if vote["winner"] == "left" else (sides[1][0], sides[0][0])
        feedback.vote_ids.append(vote["id"])
        feedback.pairs.append(Pair(prompt, chosen, rejected, "vote"))
    return feedback


def require(feedback: Feedback, method: str) -> None:
    """A clear error when the feedback gives `method` nothing to learn from."""
    hint = f"rate {feedback.modality} outputs of {feedback.run} (in the studio, or POST /v1/generations/ID/ratings)"
    if method == "sft" and not feedback.liked:
        raise BadRequest(f"--method sft learns from liked outputs, and run {feedback.run!r} has none "
                         f"({len(feedback.rated)} rated): {hint} good")
    if method == "dpo" and not feedback.pairs:
        raise BadRequest(f"--method dpo learns from pairs (an arena vote, or a liked and a disliked output of the "
                         f"same prompt), and run {feedback.run!r} has none ({len(feedback.liked)} liked, "
                         f"{len(feedback.disliked)} disliked): {hint}, good and bad for the same prompt, or vote "
                         f"in the arena")
    if method == "rerank" and not (feedback.pairs or (feedback.liked and feedback.disliked)):
        raise BadRequest(f"--method rerank needs liked and disliked outputs (or arena votes) of run "
                         f"{feedback.run!r}; it has {len(feedback.liked)} liked and {len(feedback.disliked)} "
                         f"disliked: {hint}")
