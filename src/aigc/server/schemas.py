"""The API's request and response bodies (pydantic), in OpenAI's shapes plus our fields.

Requests are strict: a value of the wrong type, NaN or infinity, an out-of-range number, and a field the
endpoint does not take are all refused (400, see aigc.server.app), as OpenAI refuses them; our extra
controls are declared fields, so the official client's `extra_body` reaches them. The ranges here are the
API's caps; the modality checks the rest (aigc.sample.GenerateSettings.validate and the image and series
modules), with the same messages as the CLI.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_SEED = 2**62  # image i of a request uses seed + i; torch takes seeds below 2**64
MAX_N = 16  # completions and chat: samples per request
MAX_IMAGES = 64  # images per request
MAX_PIECES = 8  # music pieces per request (each is rendered to audio)
MAX_CLIPS = 16  # video clips per request
MAX_TOKENS = 4096  # = aigc.sample.MAX_NEW_TOKENS_CAP
MAX_STOPS = 4
MAX_PATHS = 1000  # series sample paths per request (= the CLI's cap)
MAX_BEST_OF = 64  # = aigc.optimize.rerank.MAX_BEST_OF
BEST_OF = ("ours, not OpenAI's: each output is the best of this many candidates by the run's reward model (a run "
           "made by aigc optimize --method rerank; default: its own, 1 = off); a stream gets the text in one piece")
MIN_TEMPERATURE = 1e-6  # = aigc.sample.MIN_TEMPERATURE: below it logits / temperature overflow float32

Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="same request and seed, same output; "
                                                          "omitted: a fresh seed, returned as `seed`")]

Stop = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data):
        """A NUL character is refused before any work: the store (PostgreSQL text) cannot keep it."""
        if _has_nul(data):
            raise ValueError("text must not contain the NUL character (\\u0000)")
        return data


def _has_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class TextControls(Strict):
    """What completions and chat share: OpenAI's sampling fields and our decoding extras."""

    model: str = Field(min_length=1, max_length=256, description="a run name or a --model NAME (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="tokens to generate at most (default 100)")
    temperature: float | None = Field(None, ge=0, le=2, description=f"default 0.8; 0 = greedy; else at least "
                                                                    f"{MIN_TEMPERATURE:g}")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    n: int | None = Field(None, ge=1, le=MAX_N, description="samples to return (default 1)")
    stop: Stop | list[Stop] | None = Field(
        None, max_length=MAX_STOPS, description=f"up to {MAX_STOPS} strings; each sample is cut before the first")
    seed: Seed | None = None
    stream: bool | None = Field(None, description="server-sent events, ending with `data: [DONE]`")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # OpenAI fields we take only at their neutral values (anything else: 400, saying what to use instead)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    # our extras (the client's extra_body)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="keep the k most likely tokens (0 = off)")
    min_p: float | None = Field(None, ge=0, lt=1, description="drop tokens below min_p x the top probability")
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="> 1 discourages repeats")
    num_beams: int | None = Field(None, ge=1, le=16, description="beam search width (1 = none)")
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=64, description="forbid repeating n-grams of this size")
    window: int | None = Field(None, ge=0, le=1_000_000, description="the most tokens the model reads; past it, "
                               "it reads the last half again and goes on (default: the run's training block_size; "
                               "0 = all its positions)")
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF, description=BEST_OF)

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampling(cls, temperature: float | None) -> float | None:
        if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
            raise PydanticCustomError("temperature_too_small", "use 0 for greedy decoding, or at least {least}",
                                      {"least": f"{MIN_TEMPERATURE:g}"})
        return temperature


class StreamOptions(Strict):
    include_usage: bool | None = None


class CompletionRequest(TextControls):
    prompt: str | list[str] = Field("", description="the text to continue (one prompt per request)")
    echo: bool | None = Field(None, description="return the prompt before each completion")
    suffix: str | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)  # name, tool_calls, ... are kept
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(TextControls):
    messages: list[Message] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="= max_tokens")


class DiffusionSampling(Strict):
    """A diffusion run's sampling options, for the endpoints of the modalities it draws (an option the run's family
    does not take: 400)."""

    sampler: Literal["ddpm", "ddim", "dpm-solver"] | None = Field(None, description="diffusion")
    steps: int | None = Field(None, ge=1, le=1000, description="diffusion: sampling steps (default 20)")
    eta: float | None = Field(None, ge=0, le=1, description="diffusion, ddim: 0 = deterministic")
    guidance_scale: float | None = Field(None, ge=0, le=100, description="diffusion, conditional: 1 = none")

    def sampling(self) -> dict:
        """The options as the modality's `generate` takes them (None: the run's default)."""
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta, "guidance_scale": self.guidance_scale}


class ImageRequest(DiffusionSampling):
    model: str = Field(min_length=1, max_length=256)
    prompt: str = Field("", max_length=1000, description="conditional runs: a class name or index; else empty")
    n: int | None = Field(None, ge=1, le=MAX_IMAGES, description="images (default 1)")
    size: str | None = Field(None, max_length=32, description="WxH; must be the run's size")
    response_format: Literal["url", "b64_json"] | None = Field(None, description="default url")
    output_format: Literal["png"] | None = None
    seed: Seed | None = None
    user: str | None = Field(None, max_length=256)
    # our extras beside diffusion's: the family's sampling options (an option the family does not take: 400)
    truncation: float | None = Field(None, gt=0, le=100, description="dcgan: truncate latents to [-T, T]")
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF, description=BEST_OF)


class ForecastRequest(Strict):
    model: str = Field(min_length=1, max_length=256)
    horizon: int = Field(ge=1, le=1000, description="steps to forecast")
    level: float | None = Field(None, gt=0, lt=1, description="prediction-interval level (default 0.95)")
    paths: int | None = Field(None, ge=0, le=MAX_PATHS, description="sample paths (default 0)")
    noise: Literal["gaussian", "bootstrap"] | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF, description="sample paths: " + BEST_OF)
    seed: Seed | None = None
    user: str | None = Field(None, max_length=256)


class AudioRequest(Strict):
    model: str = Field(min_length=1, max_length=256, description="a music run or a sound run")
    n: int | None = Field(None, ge=1, le=MAX_PIECES, description="pieces or sounds (default 1)")
    bars: int | None = Field(None, ge=1, le=64, description="bars per piece (default 8)")
    temperature: float | None = Field(None, ge=0, le=100, description="music: default the run's calibrated "
                                       "temperature (aigc calibrate), else 0.8; 0 = greedy")
    top_k: int | None = Field(None, ge=0, le=100_000, description="0 = off")
    top_p: float | None = Field(None, gt=0, le=1, description="music: default 0.95; 1 = off")
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF, description=BEST_OF)
    prompt_piece: str | None = Field(None, min_length=1, max_length=256,
                                     description="music runs: continue the opening of this validation piece of the "
                                                 "run (GET /v1/models/{model}/controls lists them as `openings`)")
    prompt_bars: int | None = Field(None, ge=1, le=16, description="music runs: bars of prompt_piece continued "
                                                                   "(default 2)")
    harmonise_piece: str | None = Field(None, min_length=1, max_length=256,
                                        description="music runs: keep the soprano of this validation piece of the run "
                                                    "(one of `openings`) and write the voices below it; the piece is "
                                                    "as long as the melody (no bars, no prompt_piece)")
    prompt_midi_b64: str | None = Field(None, min_length=1,
                                        description="music runs: a MIDI file of your own (base64; at most 1 MiB, "
                                                    "413 above) whose first prompt_bars bars are continued "
                                                    "(instead of prompt_piece)")
    harmonise_midi_b64: str | None = Field(None, min_length=1,
                                           description="music runs: a MIDI file of your own (base64; at most 1 MiB, "
                                                       "413 above) whose top voice is the melody harmonised "
                                                       "(instead of harmonise_piece)")
    candidates: int | None = Field(None, ge=1, le=16, description="music runs, with harmonise_piece: chords drawn "
                                                                 "per melody note, the one that best foresees the "
                                                                 "note kept (default 4; 1: one draw)")
    constrained: bool | None = Field(None, description="music runs: grammar-constrained sampling (default true; "
                                                       "docs/audio.md)")
    grammar_version: int | None = Field(None, ge=1, le=2, description="music runs: the version of constrained "
                                        "sampling's grammar (default the newest, 2: a sounding pitch is not struck "
                                        "again; 1: as pieces were sampled before 2026-12-07)")
    window: int | None = Field(None, ge=0, le=1_000_000, description="music runs: the most tokens the model reads; "
                               "past it, it reads the last half again and goes on (default: the run's training "
                               "block_size; 0 = all its positions)")
    seed: Seed | None = None
    user: str | None = Field(None, max_length=256)
    # sound runs (drum hits): the class of a conditional run, and a diffusion run's sampling steps
    instrument: str | None = Field(None, max_length=256, description="sound runs, conditional: the class (e.g. "
                                                                        "snare) or its index")
    steps: int | None = Field(None, ge=1, le=1000, description="sound runs, diffusion: sampling steps (default 20)")


class VideoRequest(DiffusionSampling):
    model: str = Field(min_length=1, max_length=256, description="a video run (a clip generator or a predictor)")
    prompt: str = Field("", max_length=1000, description="conditional clip generators: a class name or index; "
                                                         "else empty")
    n: int | None = Field(None, ge=1, le=MAX_CLIPS, description="clips (default 1)")
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF, description="clip generators: " + BEST_OF)
    temperature: float | None = Field(None, ge=0, le=4, description="vae-rnn: the scale of each latent's noise "
                                                                     "(default: the run's, 1; 0 = the means)")
    seed: Seed | None = None
    user: str | None = Field(None, max_length=256)


class RatingRequest(Strict):
    score: int = Field(ge=-1, le=1, description="-1 bad, 0 neutral, +1 good")  # an int: a Literal takes true and 1.0
    stars: int | None = Field(None, ge=1, le=5)
    comment: str | None = Field(None, max_length=10_000)
    index: int | None = Field(None, ge=0, le=MAX_IMAGES, description="which output of several (text n > 1)")


ARENA_MODALITIES = ("text", "image", "music", "video", "sound")
FAMILY_NAMES = Literal["ngram", "rnn", "gpt", "vae", "dcgan", "diffusion", "simvp", "vae-rnn",
                      "ar"]  # = aigc.models.FAMILIES


class TrainingRequest(Strict):
    family: FAMILY_NAMES
    data: str = Field(min_length=1, max_length=256, description="a named data set (GET /v1/datasets) or an "
                                                                "upload's id (POST /v1/uploads)")
    name: str | None = Field(None, min_length=1, max_length=128, description="the run's name (default: "
                                                                            "FAMILY-DATA-TIMESTAMP)")
    preset: Literal["quick", "good"] | None = Field(None, description="quick = 2 minutes, good = 10")
    minutes: float | None = Field(None, gt=0, le=600, description="training-time budget (default: quick)")
    conditional: bool | None = Field(None, description="image families: the class-conditional variant")
    sets: dict[str, str] | None = Field(None, max_length=64, description="configuration keys (aigc train --set)")


class OptimizationRequest(Strict):
    model: str = Field(min_length=1, max_length=256, description="the finished run to improve")
    method: Literal["sft", "dpo", "rerank"] = Field(description="sft: fine-tune on liked outputs; dpo: on preference "
                                                                "pairs (text); rerank: a reward model for best-of-n")
    name: str | None = Field(None, min_length=1, max_length=128, description="the new run's name (default: "
                                                                            "MODEL-METHOD)")
    max_steps: int | None = Field(None, ge=1, le=1_000_000, description="sft and dpo: optimizer steps (default 100 "
                                                                               "for text, 1000 for images)")
    sets: dict[str, str] | None = Field(None, max_length=64, description="[train] and [optimize] keys (aigc optimize "
                                                                         "--set)")


class EvaluationRequest(Strict):
    model: str = Field(min_length=1, max_length=256)


class BattleRequest(Strict):
    modality: Literal["text", "image", "music", "video", "sound"] = "text"
    prompt: str | None = Field(None, max_length=2000, description="text: the prompt both continue; image, video, "
                                                                  "sound: the class both draw (conditional runs); "
                                                                  "music: none")
    seed: Seed | None = None
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, min_length=2, max_length=2, description="the two runs (default: drawn at random)")


class VoteRequest(Strict):
    winner: Literal["left", "right", "tie", "both_bad"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    generating: int  # requests at work now
    waiting: int  # requests queued behind them


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    modality: str
    family: str
    data: str | None = None
    status: str | None = None
    headline: dict | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    generation_id: str
    seed: int
    batch_rows: int = Field(1, description="samples decoded together with this one (batching)")


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    generation_id: str
    seed: int
    batch_rows: int = Field(1, description="samples decoded together with this one (batching)")


class ImageDatum(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    generation_id: str
    seed: int


class AudioDatum(BaseModel):
    index: int
    kind: Literal["music", "sound"] = "music"
    bars: int | None = None  # music
    notes: int | None = None  # music
    wav_b64: str  # 16-bit PCM mono WAV
    midi_b64: str | None = None  # music: standard MIDI file, the generation record as a text event
    wav_url: str  # the same files, kept in the store: GET /v1/generations/{id}/files/NNN.wav
    midi_url: str | None = None
    png_url: str  # music: the piano roll; sound: the spectrogram
    record: dict  # the record the files carry (run, settings with the seed, index; sound: class, class_name)


class AudioResponse(BaseModel):
    id: str
    object: Literal["audio"] = "audio"
    created: int
    model: str
    generation_id: str
    seed: int
    rendered_with: str  # fluidsynth and its soundfont, or the plain synthesis; sound: Griffin-Lim
    data: list[AudioDatum]


class VideoDatum(BaseModel):
    index: int
    frames: int
    fps: float  # frames a second of the GIF and the MP4 (the MP4 lasts frames / fps seconds)
    gif_b64: str  # the clip as a looping GIF, its record as the GIF comment
    gif_url: str  # the same file, kept in the store: GET /v1/generations/{id}/files/NNN.gif
    mp4_url: str  # the clip as an MP4 (H.264), its record as the comment tag: GET .../files/NNN.mp4
    record: dict  # the clip's generation record (run, seed, class, sampling options)


class VideoResponse(BaseModel):
    id: str
    object: Literal["video"] = "video"
    created: int
    model: str
    generation_id: str
    seed: int
    job: Literal["generate", "predict"]  # a predictor's clips are its validation context and the frames it predicted
    sheet_b64: str  # PNG frame sheet: a row per clip (a predictor's: the truth above each prediction)
    sheet_url: str  # the same file, kept in the store: GET /v1/generations/{id}/files/sheet.png
    data: list[VideoDatum]


class ImagesResponse(BaseModel):
    id: str  # the first image's generation id; each image has its own in `data`
    created: int
    data: list[ImageDatum]
    generation_id: str
    model: str


class ForecastResponse(BaseModel):
    id: str
    object: Literal["forecast"] = "forecast"
    created: int
    model: str
    generation_id: str
    seed: int
    forecast: dict


class Generation(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["generation"] = "generation"
    created: str
    run: str
    modality: str
    request: dict
    ratings: list[dict]


class GenerationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Generation]
    total: int


class Rating(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["rating"] = "rating"
    generation_id: str
    score: int


TextControls.model_rebuild()
CompletionRequest.model_rebuild()
ChatRequest.model_rebuild()
