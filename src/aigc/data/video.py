"""Video data: moving-object clips made by seeded code, the real clip set `vtest`, the user's own GIF and MP4
files; writing GIFs and MP4s.

Every source becomes clips as uint8 arrays shaped (N, T, H, W, C), C = 1 (grayscale) or 3 (RGB), with a class
label per clip where the clip has one object of a labelled image set. Models see a clip as one tensor
(N, T * C, H, W) in [-1, 1]: the frames stacked as channels (`to_tensor`), so the image families (vae,
diffusion) take a clip as an image with T * C channels, and a predictor splits the channels back into frames.

Named clip sets (`NAMED_VIDEOS`) are made by `moving_objects`, the construction of the standard Moving MNIST
(Srivastava et al. 2015; the generator OpenSTL and E3D-LSTM use): each object starts at a uniform position and
heads in a uniform direction at 0.1 of the free span per frame, bouncing off the frame's edges; objects are
combined by the pixel-wise maximum. Training clips are cut from the training images only, validation clips from
the test images only, so no held-out image is ever seen in training.

Real clip sets (`REAL_VIDEOS`) are one video file cut into consecutive clips, split by time: the last clips are the
validation ones, one clip's length after the last training frame.

MP4 is read and written with PyAV (FFmpeg's libraries in its wheel; H.264 by its bundled libx264), imported where
it is used: it takes a second or more to import, which the CLI should not pay when it touches no MP4.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from aigc.config import option
from aigc.data.images import load_images
from aigc.errors import UserError
from aigc.fsutil import atomic_write_bytes

VIDEO_EXTENSIONS = (".gif", ".mp4", ".avi")  # files a folder of clips may hold (MP4 and AVI read by PyAV)
MAX_FRAMES = 1000  # frames one file may hold: a longer one is refused, not read into memory
MAX_SIDE = 512  # largest frame side read
STEP = 0.1  # Moving MNIST: an object moves this share of the free span per frame
FRAME_MS = 100  # how long a GIF frame shows (10 frames a second)
MP4_CRF = 18  # H.264 constant rate factor of the MP4s written: 0 is lossless (a profile browsers do not play)


@dataclass(frozen=True)
class NamedVideos:
    """A clip set made from a named image set by `moving_objects`."""

    name: str  # key in NAMED_VIDEOS
    images: str  # the NAMED_IMAGES set its objects come from
    package: str  # what provides the images
    size: int  # default frame side
    scale: int  # objects are enlarged this many times (nearest neighbour) before they move
    description: str


NAMED_VIDEOS: dict[str, NamedVideos] = {
    "moving-fashion-mnist": NamedVideos(
        "moving-fashion-mnist", "fashion-mnist", "dataset-fashion-mnist", 64, 1,
        "Fashion-MNIST clothes (28x28) bouncing in 64x64 frames, 20 frames a clip, made by seeded code (the "
        "construction of Moving MNIST); training clips from the 60000 training images, validation from the 10000 "
        "test images"),
    "moving-digits": NamedVideos(
        "moving-digits", "digits", "scikit-learn", 32, 2,
        "scikit-learn's 8x8 digits, enlarged to 16x16, bouncing in 32x32 frames, 20 frames a clip; training clips "
        "from the 1500 training digits, validation from the 297 test digits"),
}  # fmt: skip


@dataclass(frozen=True)
class RealVideo:
    """A real clip set: one video file, cut into consecutive clips."""

    name: str  # key in REAL_VIDEOS
    path: str  # the video file
    package: str  # the Debian package that installs it
    licence: str
    height: int  # default frame size (grayscale), a whole fraction of the file's
    width: int
    description: str


REAL_VIDEOS: dict[str, RealVideo] = {
    "vtest": RealVideo(
        "vtest", "/usr/share/doc/opencv-doc/examples/data/vtest.avi", "opencv-doc", "Apache-2.0 AND BSD-3-Clause",
        48, 64,
        "OpenCV's vtest.avi: pedestrians on a square, filmed from a raised camera (795 frames of 768x576 at 10 "
        "frames a second), grayscale (its luma), reduced to 48x64 (box filter, 12x), cut into consecutive clips (39 "
        "of 20 frames; --set frames=16: 49); split by time: the last clips are the validation ones"),
}  # fmt: skip


def is_named(spec: str) -> bool:
    """Whether --data names a clip set (made by code or a real one), not a path."""
    return spec in NAMED_VIDEOS or spec in REAL_VIDEOS


@dataclass
class VideoDataConfig:
    frames: int = option(20, "frames per clip (a folder's files are cut into clips of this many frames)", min=2,
                         max=MAX_FRAMES)
    size: int = option(0, "frame side in pixels; 0 = the data's own (moving-fashion-mnist 64, moving-digits 32, vtest "
                          "48x64, a folder as its files are)", min=0, max=MAX_SIDE)
    objects: int = option(1, "named clip sets: objects per clip (2 is the standard Moving MNIST setting)", min=1,
                          max=4)
    context: int = option(10, "prediction: the frames given; the predictor predicts the remaining ones", min=1)
    val_clips: int = option(1000, "named clip sets: validation clips, made from the test images", min=1,
                            max=100_000)
    split_seed: int = option(0, "seed of the validation clips (named sets) and of a folder's split", min=0)
    val_fraction: float = option(0.1, "a folder or a real clip set: share of its clips held out for validation (a "
                                      "real set's last ones)", min=0.0, max=0.5, min_exclusive=True)
    conditional: bool = option(False, "clip generators: the class-conditional variant (one-object named sets; set "
                                      "by --conditional)")


@dataclass(frozen=True, eq=False)
class Clips:
    """Clips as uint8 (N, T, H, W, C), their labels, and where they came from."""

    source: str  # a NAMED_VIDEOS key, or the absolute path that was loaded
    clips: np.ndarray  # uint8 (N, T, H, W, C)
    labels: np.ndarray | None  # int64 (N,): the class of a one-object clip; None otherwise
    class_names: tuple[str, ...] | None
    boxes: np.ndarray | None = None  # int64 (N, T, objects, 2): each object's top-left corner (y, x), named sets

    @property
    def n(self) -> int:
        return self.clips.shape[0]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(T, H, W, C) of one clip."""
        return tuple(self.clips.shape[1:])

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(repr(self.clips.shape).encode())
        h.update(np.ascontiguousarray(self.clips).tobytes())
        if self.labels is not None:
            h.update(self.labels.astype("<i8").tobytes())
        return h.hexdigest()


# ---- moving objects --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)  # a server making clips at every request reads the images once
def object_images(name: str, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The objects of a named clip set: the images of its image set's `split` (enlarged), uint8 (N, h, w, 1),
    read-only."""
    named = NAMED_VIDEOS[name]
    data = load_images(named.images, split=split)
    images = data.images
    if named.scale > 1:
        images = images.repeat(named.scale, axis=1).repeat(named.scale, axis=2)
    images.flags.writeable = False
    return images, data.labels, data.class_names


def trajectories(rng: np.random.Generator, n: int, objects: int, frames: int) -> np.ndarray:
    """Positions (n, frames, objects, 2) in [0, 1] of bouncing objects: the Moving MNIST generator, vectorised."""
    pos = rng.random((n, objects, 2))  # (y, x)
    theta = rng.random((n, objects)) * 2 * np.pi
    velocity = np.stack([np.sin(theta), np.cos(theta)], axis=-1)  # (n, objects, 2)
    out = np.empty((n, frames, objects, 2))
    for t in range(frames):
        pos = pos + velocity * STEP
        low, high = pos <= 0, pos >= 1
        velocity = np.where(low | high, -velocity, velocity)  # bounce: reverse the component that hit an edge
        pos = np.clip(pos, 0, 1)
        out[:, t] = pos
    return out


def moving_objects(images: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator, n: int, *,
                   frames: int, size: int, objects: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n clips (n, frames, size, size, 1) of `objects` images drawn from `images` (N, h, w, 1) moving in a
    size x size frame; returns the clips, the images drawn (n, objects) and the corners (n, frames, objects, 2).

    1. draw the images and the trajectories from `rng`;
    2. per frame and object, paste the image at its corner with the pixel-wise maximum (overlaps stay bright).
    """
    h, w = images.shape[1:3]
    if size < max(h, w):
        raise UserError(f"frames of {size}x{size} are smaller than the objects ({w}x{h}): use --set size={max(h, w)} "
                        f"or more")
    picks = rng.integers(0, len(images), (n, objects))
    corners = np.rint(trajectories(rng, n, objects, frames) * [size - h, size - w]).astype(np.int64)
    clips = np.zeros((n, frames, size, size, 1), dtype=np.uint8)
    rows, cols, clip = np.arange(h), np.arange(w), np.arange(n)[:, None, None]
    for o in range(objects):
        pixels = images[picks[:, o], :, :, 0]  # (n, h, w)
        for t in range(frames):
            r = corners[:, t, o, 0, None, None] + rows[None, :, None]  # (n, h, 1)
            c = corners[:, t, o, 1, None, None] + cols[None, None, :]  # (n, 1, w)
            clips[clip, t, r, c, 0] = np.maximum(clips[clip, t, r, c, 0], pixels)
    return clips, picks, corners


def named_clips(name: str, split: str, n: int, seed: int, cfg: VideoDataConfig) -> Clips:
    """n clips of a named set from its `split` images (train or test), made at `seed`."""
    images, labels, class_names = object_images(name, split)
    size = cfg.size or NAMED_VIDEOS[name].size
    clips, picks, corners = moving_objects(images, labels, np.random.default_rng(seed), n, frames=cfg.frames,
                                           size=size, objects=cfg.objects)
    one = cfg.objects == 1
    return Clips(name, clips, labels[picks[:, 0]] if one else None, class_names if one else None, corners)


class ClipMaker:
    """Fresh training clips of a named set for every batch (as Srivastava et al. trained on Moving MNIST): the
    training images and the construction, drawing from a torch generator so that a run's batches are seeded."""

    def __init__(self, name: str, cfg: VideoDataConfig):
        self.name, self.cfg = name, cfg
        self.images, self.labels, self.class_names = object_images(name, "train")
        self.size = cfg.size or NAMED_VIDEOS[name].size

    def make(self, generator: torch.Generator, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        clips, picks, _ = moving_objects(self.images, self.labels, np.random.default_rng(seed), n,
                                         frames=self.cfg.frames, size=self.size, objects=self.cfg.objects)
        return clips, (self.labels[picks[:, 0]] if self.cfg.objects == 1 else None)


# ---- reading clips ---------------------------------------------------------------------------------------------


def is_video_data(spec: str) -> bool:
    """Whether --data names clips: a named clip set, a .gif/.mp4/.avi file (a GIF with more than one frame), or a
    folder holding an .mp4, an .avi or an animated GIF (a folder of still GIFs is an image set)."""
    if is_named(spec):
        return True
    path = Path(spec).expanduser()
    files = [path] if path.is_file() else sorted(video_files(path)) if path.is_dir() else []
    for file in files:
        if file.suffix.lower() in (".mp4", ".avi"):
            return True
        if file.suffix.lower() == ".gif" and _gif_frames_over(file, 1):
            return True
    return False


def video_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _gif_frames_over(path: Path, count: int) -> bool:
    try:
        with Image.open(path) as img:
            for i, _ in enumerate(ImageSequence.Iterator(img)):
                if i >= count:
                    return True
    except (OSError, SyntaxError, ValueError, EOFError):
        return False
    return False


def read_video(path: Path) -> np.ndarray:
    """The frames of one GIF, MP4 or AVI file as uint8 (T, H, W, 3). Unreadable, a frame of another size, one
    frame, more than MAX_FRAMES frames: a UserError naming the file."""
    path = Path(path)
    if path.suffix.lower() != ".gif":
        frames = _read_av(path)
    else:
        frames = _read_gif(path)
    if not frames:
        raise UserError(f"cannot read video {path}: it has no frames")
    for i, frame in enumerate(frames):
        if frame.shape != frames[0].shape:
            raise UserError(f"{path}: frames differ in size: frame 0 is {frames[0].shape[1]}x{frames[0].shape[0]}, "
                            f"frame {i} is {frame.shape[1]}x{frame.shape[0]}")
    if len(frames) < 2:
        raise UserError(f"{path} has 1 frame: a clip needs at least 2 (a still image is image data)")
    if max(frames[0].shape[:2]) > MAX_SIDE:
        raise UserError(f"{path}: frames of {frames[0].shape[1]}x{frames[0].shape[0]} are over {MAX_SIDE} pixels a "
                        f"side: make them smaller")
    return np.stack(frames)


def _read_gif(path: Path) -> list[np.ndarray]:
    """A GIF's frames at its shortest frame duration: GIF writers merge identical consecutive frames into one
    longer frame (PIL does), so a frame shown k times as long as the shortest counts k times."""
    frames, durations = [], []
    try:
        with Image.open(path) as img:
            for frame in ImageSequence.Iterator(img):
                if len(frames) == MAX_FRAMES:
                    raise UserError(f"{path} has more than {MAX_FRAMES} frames: cut it into shorter files")
                frames.append(np.asarray(frame.convert("RGB")))
                durations.append(int(frame.info.get("duration") or 0))
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise UserError(f"cannot read video {path}: {err}") from None
    base = min(durations)
    if base <= 0 or any(d % base for d in durations):  # no common frame rate: each frame once
        return frames
    out = [frame for frame, d in zip(frames, durations, strict=True) for _ in range(d // base)]
    if len(out) > MAX_FRAMES:
        raise UserError(f"{path} has more than {MAX_FRAMES} frames: cut it into shorter files")
    return out


def _read_av(path: Path, *, max_frames: int = MAX_FRAMES, to: Callable[[object], np.ndarray] | None = None
             ) -> list[np.ndarray]:
    """The frames of a file FFmpeg reads (MP4, AVI, ...), decoded one by one: more than `max_frames` is a UserError
    once that many are read, so a long file is never held in memory. `to` turns a decoded frame into the array
    kept (default: RGB, uint8 (H, W, 3))."""
    import av  # a second or more to import: only where a file is read

    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"cannot read video {path}: it has no video stream")
            for frame in container.decode(video=0):
                if len(frames) == max_frames:
                    raise UserError(f"{path} has more than {max_frames} frames: cut it into shorter files")
                frames.append(to(frame) if to is not None else frame.to_ndarray(format="rgb24"))
    except (av.FFmpegError, OSError) as err:
        raise UserError(f"cannot read video {path}: {err}") from None
    return frames


def load_folder(spec: str, cfg: VideoDataConfig) -> Clips:
    """A GIF/MP4 file, or a folder of them (sub-folders are classes, as for images): every file cut into clips of
    cfg.frames frames (the rest of a file dropped), resized to cfg.size x cfg.size when set; grayscale when every
    frame of every file is."""
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise UserError(f"no such file or directory: {spec} (and it is not a named clip set: "
                        f"{', '.join(NAMED_VIDEOS)})")
    files = [path] if path.is_file() else video_files(path)
    if not files:
        raise UserError(f"no clips under {path} (looked for {', '.join(VIDEO_EXTENSIONS)}, in sub-folders too)")
    root = path if path.is_dir() else path.parent
    class_names = tuple(sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1}))
    if class_names and any(len(f.relative_to(root).parts) == 1 for f in files):
        raise UserError(f"{path} has class sub-folders ({', '.join(class_names)}) and also clips directly in it: "
                        f"move those into a class sub-folder")
    clips, labels, first = [], [], None
    for file in files:
        frames = read_video(file)
        if cfg.size:
            frames = _resize(frames, cfg.size)
        if first is None:
            first = (file, frames.shape[1:3])
        elif frames.shape[1:3] != first[1]:
            raise UserError(f"clips differ in size: {first[0]} is {first[1][1]}x{first[1][0]}, {file} is "
                            f"{frames.shape[2]}x{frames.shape[1]}; give --set size=N to resize them all to N x N")
        if len(frames) < cfg.frames:
            raise UserError(f"{file} has {len(frames)} frames, fewer than a clip's {cfg.frames}: give --set "
                            f"frames={len(frames)} or a longer file")
        for start in range(0, len(frames) - cfg.frames + 1, cfg.frames):
            clips.append(frames[start:start + cfg.frames])
            if class_names:
                labels.append(class_names.index(file.relative_to(root).parts[0]))
    array = np.stack(clips)
    if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
        array = array[..., :1]
    return Clips(str(path), np.ascontiguousarray(array), np.array(labels, dtype=np.int64) if class_names else None,
                 class_names or None)


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    if frames.shape[1:3] == (size, size):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.LANCZOS)) for f in frames])


def real_installed(name: str) -> bool:
    """Whether a real clip set's file is on this machine."""
    return Path(REAL_VIDEOS[name].path).is_file()


@functools.lru_cache(maxsize=4)  # a run's clips are read again to check them, to evaluate, to predict
def _real_frames(path: str, height: int, width: int) -> np.ndarray:
    """Every frame of a video file, grayscale (its luma plane as decoded), resized to height x width: uint8
    (T, H, W), read-only. A whole fraction of the file's size is a box filter (each pixel the rounded mean of a
    block), any other size Lanczos."""
    def gray(frame) -> np.ndarray:
        luma = frame.to_ndarray(format="gray")  # (H0, W0)
        fy, fx = luma.shape[0] // height, luma.shape[1] // width
        if (fy, fx) != (0, 0) and fy == fx and luma.shape == (height * fy, width * fx):
            return np.rint(luma.reshape(height, fy, width, fx).mean(axis=(1, 3))).astype(np.uint8)
        return np.asarray(Image.fromarray(luma).resize((width, height), Image.Resampling.LANCZOS))

    frames = np.stack(_read_av(Path(path), to=gray))
    frames.flags.writeable = False
    return frames


def real_clips(name: str, cfg: VideoDataConfig) -> Clips:
    """A real clip set's video cut into consecutive clips of cfg.frames frames (the rest dropped), in time order,
    grayscale, at the set's size (cfg.size: size x size)."""
    real = REAL_VIDEOS[name]
    if not real_installed(name):
        raise UserError(f"clip set '{name}' needs the Debian package {real.package} ({real.path} is missing): "
                        f"sudo apt-get install --no-install-recommends {real.package} (or scripts/setup.sh --corpora)")
    height, width = (cfg.size, cfg.size) if cfg.size else (real.height, real.width)
    frames = _real_frames(real.path, height, width)
    n = len(frames) // cfg.frames
    if n == 0:
        raise UserError(f"{name} has {len(frames)} frames, fewer than a clip's {cfg.frames}: give --set frames=N "
                        f"with a smaller N")
    clips = frames[:n * cfg.frames].reshape(n, cfg.frames, height, width, 1)
    return Clips(name, np.ascontiguousarray(clips), None, None)


def split_by_time(data: Clips, cfg: VideoDataConfig) -> tuple[Clips, Clips]:
    """Consecutive clips of one video split by time: the last cfg.val_fraction for validation, the clip before
    them left out (a gap, so that no validation clip continues a training clip frame for frame), the rest for
    training."""
    n_val = max(1, int(round(data.n * cfg.val_fraction)))
    n_train = data.n - n_val - 1
    if n_train < 1:
        raise UserError(f"{data.source}: {data.n} clip(s) of {cfg.frames} frames are too few to hold some out by "
                        f"time: give --set frames=N with a smaller N")
    return (Clips(data.source, data.clips[:n_train], None, None),
            Clips(data.source, data.clips[data.n - n_val:], None, None))


def load_split(spec: str, cfg: VideoDataConfig) -> tuple[Clips | ClipMaker, Clips]:
    """Training and validation clips. A named set: a ClipMaker of fresh training clips from the training images,
    and cfg.val_clips validation clips from the test images at cfg.split_seed. A folder: its clips, shuffled at
    cfg.split_seed, the last cfg.val_fraction held out."""
    if cfg.context >= cfg.frames:
        raise UserError(f"context={cfg.context} leaves no frame to predict in clips of {cfg.frames} frames: use "
                        f"--set context=N with N < frames")
    if spec in NAMED_VIDEOS:
        if cfg.conditional and cfg.objects != 1:
            raise UserError("--conditional needs one object a clip (a clip's class is its object's)")
        return ClipMaker(spec, cfg), named_clips(spec, "test", cfg.val_clips, cfg.split_seed, cfg)
    if cfg.objects != 1:
        raise UserError("--set objects applies to the named clip sets (moving-fashion-mnist, moving-digits)")
    if spec in REAL_VIDEOS:
        if cfg.conditional:
            raise UserError(f"--conditional needs class labels, and {spec} has none (one video, no classes)")
        return split_by_time(real_clips(spec, cfg), cfg)
    data = load_folder(spec, cfg)
    if cfg.conditional and data.labels is None:
        raise UserError(f"--conditional needs class labels, and {spec} has none (use class sub-folders)")
    order = np.random.default_rng(cfg.split_seed).permutation(data.n)
    cut = data.n - max(1, int(round(data.n * cfg.val_fraction)))
    if cut < 1:
        raise UserError(f"{spec}: {data.n} clip(s) of {cfg.frames} frames are too few to hold some out: give more "
                        f"files or --set frames=N with a smaller N")

    def part(idx: np.ndarray) -> Clips:
        return Clips(data.source, data.clips[np.sort(idx)], None if data.labels is None else
                     data.labels[np.sort(idx)], data.class_names)

    return part(order[:cut]), part(order[cut:])


# ---- tensors ---------------------------------------------------------------------------------------------------


def to_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 (N, T, H, W, C) -> float32 (N, T * C, H, W) in [-1, 1]: frames stacked as channels."""
    n, t, h, w, c = clips.shape
    clips = np.ascontiguousarray(clips)
    if not clips.flags.writeable:  # e.g. clips read from the cache: torch warns on a read-only array
        clips = clips.copy()
    x = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).reshape(n, t * c, h, w)
    return x.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor, channels: int) -> np.ndarray:
    """float (N, T * C, H, W) in [-1, 1] -> uint8 (N, T, H, W, C), clamped and rounded: `to_tensor`'s inverse."""
    n, tc, h, w = x.shape
    pixels = ((x.detach().float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return pixels.reshape(n, tc // channels, channels, h, w).permute(0, 1, 3, 4, 2).cpu().numpy()


# ---- writing ---------------------------------------------------------------------------------------------------


def gif_bytes(frames: np.ndarray, record: dict | None = None, *, scale: int = 1) -> bytes:
    """uint8 frames (T, H, W, C) as a looping GIF, each frame enlarged `scale` times (nearest neighbour), with
    `record` as the GIF's comment (JSON). Grayscale frames keep their 256 levels exactly (an L-mode palette);
    RGB frames are quantised to the GIF's 256 colours. Identical consecutive frames are kept as frames (no
    merging), so a GIF read back has T frames."""
    t, h, w, c = frames.shape
    pictures = [Image.fromarray(f[:, :, 0] if c == 1 else f).resize((w * scale, h * scale), Image.Resampling.NEAREST)
                for f in frames]
    buffer = io.BytesIO()
    extra = {"comment": json.dumps(record, sort_keys=True).encode()} if record is not None else {}
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=FRAME_MS, loop=0,
                     optimize=False, disposal=1, **extra)
    return buffer.getvalue()


def save_gif(path: Path, frames: np.ndarray, record: dict | None = None, *, scale: int = 1) -> None:
    atomic_write_bytes(Path(path), gif_bytes(frames, record, scale=scale))


def mp4_bytes(frames: np.ndarray, record: dict | None = None) -> bytes:
    """uint8 frames (T, H, W, C) as an MP4: H.264 (libx264, constant rate factor MP4_CRF, one thread and no
    lookahead, so the same frames give the same bytes) in yuv420p at 10 frames a second, `record` as the file's
    comment tag (JSON). yuv420p halves the colour planes, so both sides must be even: a clip with an odd side is
    written twice as large (each pixel a 2x2 block; nearest neighbour). Grayscale frames are written as RGB with
    R = G = B and read back so."""
    import av  # a second or more to import: only where a file is written

    t, h, w, c = frames.shape
    if h % 2 or w % 2:
        frames = frames.repeat(2, axis=1).repeat(2, axis=2)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        if record is not None:
            out.metadata["comment"] = json.dumps(record, sort_keys=True)
        # no macroblock tree and no rate-control lookahead: with them x264's bytes varied from run to run on a
        # loaded machine (measured: 2-4 different files in 50 writes of one clip), without them they never did
        stream = out.add_stream("libx264", rate=1000 // FRAME_MS, options={
            "crf": str(MP4_CRF), "preset": "medium", "x264-params": "mbtree=0:rc-lookahead=0"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1  # x264's output depends on its threads: one, for exact bytes
        for frame in frames:
            rgb = np.ascontiguousarray(np.repeat(frame, 3, axis=2) if c == 1 else frame)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())  # flush the encoder's delayed frames
    return buffer.getvalue()


def save_mp4(path: Path, frames: np.ndarray, record: dict | None = None) -> None:
    atomic_write_bytes(Path(path), mp4_bytes(frames, record))


def read_mp4_record(path: Path) -> dict:
    """The generation record an MP4 written by `save_mp4` carries in its comment tag."""
    import av  # a second or more to import: only where a file is read

    try:
        with av.open(str(path)) as container:
            comment = container.metadata.get("comment")
    except (av.FFmpegError, OSError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    return _record(path, comment, "an MP4")


def read_record(path: Path) -> dict:
    """The generation record of a clip file written by `aigc generate`: a GIF's comment or an MP4's comment tag."""
    return read_mp4_record(path) if Path(path).suffix.lower() == ".mp4" else read_gif_record(path)


def read_gif_record(path: Path) -> dict:
    """The generation record a GIF written by `save_gif` carries in its comment."""
    try:
        with Image.open(path) as img:
            comment = img.info.get("comment")
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    return _record(path, comment, "a GIF")


def _record(path: Path, comment: bytes | str | None, kind: str) -> dict:
    if not comment:
        raise UserError(f"{path} has no generation record: give {kind} written by `aigc generate`")
    try:
        return json.loads(comment)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: its generation record is not valid JSON: {err.msg}") from None


def frame_sheet(clips: np.ndarray, pad: int = 2) -> np.ndarray:
    """Clips (N, T, H, W, C) as one image: a row per clip, a column per frame, `pad` black pixels between."""
    n, t, h, w, c = clips.shape
    sheet = np.zeros((n * (h + pad) + pad, t * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        for j in range(t):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            sheet[top:top + h, left:left + w] = clips[i, j]
    return sheet


def enlargement(side: int, target: int = 128) -> int:
    """The largest whole factor that keeps a frame side within `target` pixels (1 for larger frames)."""
    return max(1, target // side)


def describe(clips: Clips | ClipMaker, source: str) -> dict:
    if isinstance(clips, ClipMaker):
        return {"source": source, "made": "fresh clips every batch from the training images",
                "images": len(clips.images), "shape": [clips.cfg.frames, clips.size, clips.size, 1]}
    return {"source": source, "sha256": clips.sha256, "clips": clips.n, "shape": list(clips.shape)}


def mean_frame(clips: Clips | ClipMaker, n: int = 256) -> np.ndarray:
    """The mean frame (H, W, C) float in [0, 1] of training clips (a named set: n fresh clips at seed 0)."""
    if isinstance(clips, ClipMaker):
        array, _ = clips.make(torch.Generator().manual_seed(0), n)
    else:
        array = clips.clips
    return array.reshape(-1, *array.shape[2:]).mean(axis=0) / 255.0

