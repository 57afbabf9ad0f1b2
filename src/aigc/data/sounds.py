"""Sound data: short recorded sounds (drum hits) as log-mel spectrograms the image families take unchanged.

Every source becomes hits: mono audio read with soundfile (WAV, FLAC, OGG), resampled to `sample_rate` (librosa's
resampler, soxr), peak-normalised, cut or padded with silence to `seconds`, then a log-mel spectrogram (librosa:
power, `n_mels` bands, hop `hop_length`) whose decibels in [DB_FLOOR, DB_TOP] are mapped to 0..255. A hit is a
grayscale "image" (n_mels x frames x 1, uint8, the highest band in the top row, so a PNG of it reads like a
spectrogram), and the image families (vae, dcgan, diffusion) train on it as on Fashion-MNIST. Back to audio:
`to_audio` undoes the scaling and inverts the mel spectrogram with librosa (non-negative least squares to a linear
spectrogram, then Griffin-Lim seeded by the generation's seed, so the same seed gives the same samples).

Named sets (`NAMED_SOUNDS`): `drums`, the one-shot drum hits of the Debian package `sonic-pi-samples` (each file's
licence from its Debian copyright file: 68 hits CC0, 2 under the
package's MIT licence, "Files: *"). A folder: the WAV/FLAC/OGG files under it, the
classes from the first-level sub-folders (files at its root have no class: then no sub-folder may hold any). Split
by file, seeded, stratified by class (every class has a hit in each split where it has two).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aigc.config import option
from aigc.data.images import ImageData
from aigc.errors import BadRequest, NotFound

SOUND_EXTENSIONS = (".wav", ".flac", ".ogg")
MAX_FILE_SECONDS = 30.0  # a longer file is refused before it is read: these are one-shot hits, not recordings
DB_TOP, DB_FLOOR = 40.0, -50.0  # decibels (power mel of audio with a peak of 1) mapped to 255 and 0; the drum
# hits' loudest bands lie at 6..33 dB
SONIC_PI = Path("/usr/share/sonic-pi/samples")
SONIC_PI_COPYRIGHT = Path("/usr/share/doc/sonic-pi-samples/copyright")


@dataclass(frozen=True)
class NamedSounds:
    name: str
    package: str
    folder: Path
    classes: tuple[tuple[str, str], ...]  # (class name, regular expression on the file name), first match wins
    description: str


NAMED_SOUNDS: dict[str, NamedSounds] = {
    "drums": NamedSounds(
        "drums", "sonic-pi-samples", SONIC_PI,
        (("kick", r"^(bd_.*|drum_bass_.*|drum_heavy_kick|elec_.*kick)\.flac$"),
         ("snare", r"^(sn_.*|drum_snare_.*|elec_.*snare)\.flac$"),
         ("cymbal", r"^(drum_cymbal_.*|drum_splash_.*|elec_cymbal)\.flac$"),
         ("tom", r"^(drum_tom_.*|elec_fuzz_tom)\.flac$"),
         ("tabla", r"^tabla_.*\.flac$")),
        "70 one-shot drum hits of Sonic Pi (kick 18, snare 11, cymbal 8, tom 7, tabla 26; 68 CC0, 2 MIT), "
        "as 1 s log-mel spectrograms"),
}


@dataclass
class SoundDataConfig:
    sample_rate: int = option(22050, "audio is resampled to this rate (Hz)", min=4000, max=48000)
    seconds: float = option(1.0, "length of a hit: longer ones are cut, shorter ones padded with silence", min=0.1,
                            max=MAX_FILE_SECONDS)
    n_mels: int = option(64, "mel bands: the spectrogram's height", min=8, max=256)
    n_fft: int = option(1024, "FFT size of the spectrogram", min=64, max=8192)
    hop_length: int = option(350, "samples between frames (22050 Hz, 1 s, hop 350: 64 frames)", min=16, max=8192)
    griffin_lim_iters: int = option(32, "Griffin-Lim iterations when a spectrogram is turned back into audio",
                                    min=1, max=1000)
    split_seed: int = option(0, "seed of the split by file", min=0)
    val_fraction: float = option(0.2, "share of each class's files held out for validation", min=0.0, max=0.5,
                                 min_exclusive=True)
    conditional: bool = option(False, "the class-conditional variant (classes from the sub-folders; set by "
                                      "--conditional)")

    @property
    def samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))

    @property
    def frames(self) -> int:
        return 1 + self.samples // self.hop_length  # librosa's centred frames


@dataclass(frozen=True)
class SoundFile:
    path: Path
    label: int | None


def is_sound_data(spec: str) -> bool:
    """Whether --data names sounds: a named sound set, or a folder holding WAV/FLAC/OGG files."""
    if spec in NAMED_SOUNDS:
        return True
    path = Path(spec).expanduser()
    return path.is_dir() and any(p.suffix.lower() in SOUND_EXTENSIONS for p in path.rglob("*") if p.is_file())


def named_installed(name: str) -> bool:
    return (NAMED_SOUNDS[name].folder / "bd_808.flac").is_file() if name == "drums" else True


def list_files(spec: str) -> tuple[list[SoundFile], tuple[str, ...] | None, str]:
    """The files of a sound source, their class labels, the class names and the source as recorded."""
    if spec in NAMED_SOUNDS:
        named = NAMED_SOUNDS[spec]
        if not named_installed(spec):
            raise NotFound(f"{spec}: the Debian package {named.package} is not installed (apt-get install -y "
                           f"--no-install-recommends {named.package})")
        names = [c for c, _ in named.classes]
        files = []
        for path in sorted(named.folder.glob("*.flac")):
            label = next((i for i, (_, pattern) in enumerate(named.classes) if re.match(pattern, path.name)), None)
            if label is not None:
                files.append(SoundFile(path, label))
        return files, tuple(names), spec
    root = Path(spec).expanduser()
    if not root.exists():
        raise NotFound(f"no such sound folder: {spec}")
    if not root.is_dir():
        raise BadRequest(f"{spec}: give a folder of WAV/FLAC/OGG files (class sub-folders for classes)")
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SOUND_EXTENSIONS)
    if not found:
        raise BadRequest(f"{spec}: no {'/'.join(e[1:].upper() for e in SOUND_EXTENSIONS)} files in this folder")
    at_root = [p for p in found if p.parent == root]
    if len(at_root) == len(found):
        return [SoundFile(p, None) for p in found], None, str(root.resolve())
    if at_root:
        raise BadRequest(f"{spec}: files both at the top ({at_root[0].name}) and in sub-folders: put every file in a "
                         f"class sub-folder, or none")
    names = tuple(sorted({p.relative_to(root).parts[0] for p in found}))
    return [SoundFile(p, names.index(p.relative_to(root).parts[0])) for p in found], names, str(root.resolve())


def read_audio(path: Path, cfg: SoundDataConfig) -> np.ndarray:
    """A file as float32 mono at cfg.sample_rate, peak 1 (silence stays silence), cut or padded to cfg.samples.
    A file at another rate is resampled; one longer than MAX_FILE_SECONDS, or unreadable, is a clear error."""
    import librosa
    import soundfile

    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise BadRequest(f"{path}: not a readable WAV/FLAC/OGG file ({e})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise BadRequest(f"{path}: the file holds no audio")
    if info.duration > MAX_FILE_SECONDS:
        raise BadRequest(f"{path}: {info.duration:,.0f} s long; a sound here is a short hit of at most "
                         f"{MAX_FILE_SECONDS:.0f} s (cut it first)")
    try:
        x, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as e:
        raise BadRequest(f"{path}: not a readable WAV/FLAC/OGG file ({e})") from None
    x = x.mean(axis=1)  # (samples,) mono
    if not np.isfinite(x).all():
        raise BadRequest(f"{path}: the audio holds NaN or infinite samples")
    if rate != cfg.sample_rate:
        x = librosa.resample(x, orig_sr=rate, target_sr=cfg.sample_rate)
    peak = float(np.abs(x).max()) if len(x) else 0.0
    x = x / peak if peak > 0 else x
    out = np.zeros(cfg.samples, np.float32)
    out[:min(len(x), cfg.samples)] = x[:cfg.samples]
    return out


def to_spectrogram(audio: np.ndarray, cfg: SoundDataConfig) -> np.ndarray:
    """Audio (samples,) -> uint8 (n_mels, frames, 1): power mel in dB, [DB_FLOOR, DB_TOP] -> 0..255, the highest
    band in row 0."""
    import librosa

    mel = librosa.feature.melspectrogram(y=audio, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                                         n_mels=cfg.n_mels, power=2.0)  # (n_mels, frames)
    db = 10.0 * np.log10(np.maximum(mel, 1e-12))
    scaled = np.clip((db - DB_FLOOR) / (DB_TOP - DB_FLOOR), 0.0, 1.0) * 255.0
    return np.rint(scaled[::-1, :, None]).astype(np.uint8)


def to_audio(spectrogram: np.ndarray, cfg: SoundDataConfig, seed: int) -> np.ndarray:
    """uint8 (n_mels, frames, 1) -> float32 audio (cfg.samples,): the scaling undone (grey 0 is silence), the mel
    power spectrogram inverted to a linear magnitude (librosa: non-negative least squares) and its phase found by
    Griffin-Lim from a random start drawn from `seed`."""
    import librosa

    grey = spectrogram[::-1, :, 0].astype(np.float64) / 255.0
    power = np.where(grey > 0, 10.0 ** ((DB_FLOOR + grey * (DB_TOP - DB_FLOOR)) / 10.0), 0.0)
    magnitude = librosa.feature.inverse.mel_to_stft(power, sr=cfg.sample_rate, n_fft=cfg.n_fft, power=2.0)
    audio = librosa.griffinlim(magnitude, n_iter=cfg.griffin_lim_iters, hop_length=cfg.hop_length,
                               n_fft=cfg.n_fft, length=cfg.samples, random_state=np.random.RandomState(seed))
    return audio.astype(np.float32)


def load_sounds(files: list[SoundFile], class_names: tuple[str, ...] | None, source: str,
                cfg: SoundDataConfig) -> ImageData:
    """Files -> their spectrograms as ImageData (labels where the source has classes)."""
    images = np.stack([to_spectrogram(read_audio(f.path, cfg), cfg) for f in files])
    labels = None if class_names is None else np.array([f.label for f in files], dtype=np.int64)
    return ImageData(source, images, labels, class_names)


def split_files(files: list[SoundFile], cfg: SoundDataConfig) -> tuple[list[SoundFile], list[SoundFile]]:
    """A seeded split by file: of each class (or of all, unlabelled), round(n * val_fraction) files, at least one
    where the class has two or more, are held out."""
    rng = np.random.default_rng(cfg.split_seed)
    train, val = [], []
    for label in sorted({f.label for f in files}, key=lambda x: -1 if x is None else x):
        group = [f for f in files if f.label == label]
        order = rng.permutation(len(group))
        k = max(1, int(round(len(group) * cfg.val_fraction))) if len(group) >= 2 else 0
        val += [group[i] for i in sorted(order[:k])]
        train += [group[i] for i in sorted(order[k:])]
    if not train or not val:
        raise BadRequest(f"{len(files)} sound file(s) are too few to split into training and validation (at least 2)")
    return train, val


def load_split(spec: str, cfg: SoundDataConfig) -> tuple[ImageData, ImageData, dict]:
    """The training and validation spectrograms of a source, and what run.json records of it (the files of each
    split with their sha256)."""
    files, class_names, source = list_files(spec)
    train_files, val_files = split_files(files, cfg)
    train = load_sounds(train_files, class_names, source, cfg)
    val = load_sounds(val_files, class_names, source, cfg)
    return train, val, {"train": [f.path.name for f in train_files], "val": [f.path.name for f in val_files]}


@functools.cache
def licences() -> dict[str, str]:
    """File name -> licence, from the Debian copyright file of sonic-pi-samples ("*": the licence of every file not
    named; empty where the file is missing)."""
    if not SONIC_PI_COPYRIGHT.is_file():
        return {}
    out, names = {}, []
    for line in SONIC_PI_COPYRIGHT.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("Files:"):
            names = line.split(":", 1)[1].split()
        elif line.startswith("License:"):
            for name in names:
                out[name if name == "*" else Path(name).name] = line.split(":", 1)[1].strip()
            names = []
    return out


def describe(spec: str) -> dict:
    """What `aigc data show` says of sounds: the classes with their files, the licences (a named set's, from its
    Debian copyright file), the split at the default settings."""
    files, class_names, source = list_files(spec)
    named = NAMED_SOUNDS.get(spec)
    cfg = SoundDataConfig()
    train, val = split_files(files, cfg)
    of = licences() if named else {}
    counts: dict[str, int] = {}
    for f in files:
        licence = of.get(f.path.name, of.get("*", "unknown"))
        counts[licence] = counts.get(licence, 0) + 1
    classes = {name: [f.path.name for f in files if f.label == i] for i, name in enumerate(class_names or ())}
    return {"name": source, "package": named.package if named else None,
            "folder": str(named.folder) if named else source, "files": len(files), "train_files": len(train),
            "val_files": len(val), "classes": classes or {"(no classes)": [f.path.name for f in files]},
            "licences": counts, "copyright": str(SONIC_PI_COPYRIGHT) if named else None,
            "sha256": hashlib.sha256("\n".join(f.path.name for f in files).encode()).hexdigest()}
