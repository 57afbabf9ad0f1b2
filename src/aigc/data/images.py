"""Image data: load a named data set, a folder of images or an array file; scale, flip, tile, save.

Every source becomes an ``ImageData``: uint8 images shaped (N, H, W, C) with C = 1 (grayscale)
or 3 (RGB), and integer class labels when the source has classes. Models see images as float
(N, C, H, W) in [-1, 1] (``to_tensor``) and give them back through ``to_uint8``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from aigc.errors import UserError
from aigc.fsutil import atomic_write_bytes


@dataclass(frozen=True)
class NamedImages:
    """An image data set loadable by name."""

    name: str  # key in NAMED_IMAGES, e.g. "fashion-mnist"
    package: str  # what provides it: a Debian package, or the Python package that bundles it
    description: str  # one line for `aigc data list`
    classes: tuple[str, ...]  # class names, in label order


NAMED_IMAGES: dict[str, NamedImages] = {
    "fashion-mnist": NamedImages(
        "fashion-mnist", "dataset-fashion-mnist",
        "Zalando's Fashion-MNIST: 60000 train + 10000 test 28x28 grayscale clothing images, 10 classes",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "digits": NamedImages(
        "digits", "scikit-learn",
        "scikit-learn's bundled 8x8 grayscale handwritten digits: 1500 train + 297 test, 10 classes",
        tuple(str(d) for d in range(10)),
    ),
}  # fmt: skip

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
GRAY_MODES = ("1", "L", "LA")  # PIL modes kept as one channel when channels=None
DIGITS_TRAIN = 1500  # digits: the first 1500 images train, the remaining 297 test
# IDX files (LeCun's MNIST format): "train-images-idx3-ubyte", "x.idx", each optionally gzipped.
_IDX_NAME = re.compile(r"([.-]idx\d-ubyte|\.idx)(\.gz)?$", re.IGNORECASE)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value, so no field-wise __eq__/__hash__
class ImageData:
    """Images as uint8 (N, H, W, C), their labels, and where they came from."""

    source: str  # a NAMED_IMAGES key, or the absolute path that was loaded
    images: np.ndarray  # uint8 (N, H, W, C), C = 1 (grayscale) or 3 (RGB)
    labels: np.ndarray | None  # int64 (N,), or None when the data has no classes
    class_names: tuple[str, ...] | None  # label i is class_names[i]; None exactly when labels is None

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, H, W, 1|3), got {self.images.dtype} {self.images.shape}")
        if (self.labels is None) != (self.class_names is None):
            raise ValueError("labels and class_names must both be given or both be None")
        if self.labels is not None and (self.labels.dtype != np.int64 or self.labels.shape != (self.n,)):
            raise ValueError(f"labels must be int64 ({self.n},), got {self.labels.dtype} {self.labels.shape}")

    @property
    def n(self) -> int:
        return self.images.shape[0]

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def width(self) -> int:
        return self.images.shape[2]

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    @property
    def num_classes(self) -> int:
        return 0 if self.class_names is None else len(self.class_names)

    @cached_property
    def sha256(self) -> str:
        """Hex digest of the shape, the image bytes and the label bytes: names the exact training data."""
        h = hashlib.sha256(repr(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        if self.labels is not None:
            h.update(self.labels.astype("<i8").tobytes())
        return h.hexdigest()


def load_images(
    spec: str, *, split: str = "train", image_size: int | None = None, channels: int | None = None,
    skip: tuple[str, ...] = (),
) -> ImageData:
    """Load a named data set (a key of NAMED_IMAGES), a folder of images, or an .npz / IDX file.

    A folder: every image below it (IMAGE_EXTENSIONS, any case; hidden files skipped), sorted by
    path; if sub-folders of it hold images, each is a class (sorted names are labels 0..K-1). An
    .npz: images in ``x`` or ``images`` (uint8, or float in [0, 1]), labels in ``y`` or ``labels``.
    An IDX file: images, with labels from a sibling "...-labels-idx1-ubyte[.gz]" when there is one.
    ``split`` is "train" or "test"; only named data sets have a test split. ``channels`` None
    keeps the source's (a folder is grayscale only if every image is), 1 or 3 converts.
    ``image_size`` resizes every image to image_size x image_size (PIL LANCZOS). ``skip``: paths
    relative to a folder (POSIX style, e.g. "grid.png") left out.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if image_size is not None and image_size < 1:
        raise UserError(f"image size must be a positive number of pixels, got {image_size}")
    labels = class_names = None
    if spec == "fashion-mnist":
        images, labels, class_names = _load_fashion_mnist(split)
    elif spec == "digits":
        images, labels, class_names = _load_digits(split)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(
                f"no such file or directory: {spec} (and it is not a named data set: {', '.join(NAMED_IMAGES)})"
            )
        path = path.resolve()
        spec = str(path)
        if split != "train":
            raise UserError(f"{path} has no '{split}' split: a folder or array file is one set (split 'train')")
        if path.is_dir():
            images, labels, class_names = _load_folder(path, channels, image_size, skip)
        elif path.suffix.lower() == ".npz":
            images, labels, class_names = _load_npz(path)
        elif _IDX_NAME.search(path.name):
            images, labels, class_names = _load_idx_pair(path)
        else:
            raise UserError(f"{path}: not a folder of images, an .npz file or an IDX file (*-idx3-ubyte, *.idx, .gz)")
    images = _convert(images, channels, image_size)
    return ImageData(source=spec, images=images, labels=labels, class_names=class_names)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1], as x / 127.5 - 1."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C): the inverse of ``to_tensor``, clamped and rounded."""
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W), got shape {tuple(x.shape)}")
    pixels = ((x.detach().float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of (N, C, H, W) left-right with probability 0.5, drawn from ``generator``."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile (N, H, W, C) images into one (H', W', C) image, ``nrow`` images per row (default ceil(sqrt(N))).

    Like torchvision's make_grid: ``pad`` pixels of ``pad_value`` between and around the tiles.
    """
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    ncol = nrow or math.ceil(math.sqrt(n))  # images per row
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=images.dtype)
    for i in range(n):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_png(path: Path, image: np.ndarray, record: dict | None = None) -> None:
    """Write one (H, W, C) uint8 image as PNG, atomically, with ``record`` as the text chunk "aigc" (JSON)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected a uint8 (H, W, 1|3) image, got {image.dtype} {image.shape}")
    info = PngImagePlugin.PngInfo()
    if record is not None:
        info.add_text("aigc", json.dumps(record, ensure_ascii=False))  # iTXt (UTF-8) when not Latin-1
    buffer = io.BytesIO()
    pixels = image[:, :, 0] if image.shape[2] == 1 else image  # mode L or RGB
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", pnginfo=info)
    atomic_write_bytes(Path(path), buffer.getvalue())


def read_png_record(path: Path) -> dict:
    """The generation record that ``save_png`` wrote into a PNG's "aigc" text chunk."""
    try:
        with Image.open(path) as img:
            text = img.text.get("aigc") if img.format == "PNG" else None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None
    if text is None:
        raise UserError(f"{path} has no 'aigc' generation record: give a PNG written by `aigc generate`")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: the 'aigc' generation record is not valid JSON: {err.msg}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: the 'aigc' generation record is a JSON {type(record).__name__}, not an object")
    return record


def read_png(path: Path, channels: int) -> np.ndarray:
    """The pixels of one image file as (H, W, channels) uint8, at its own size (1 channel: gray, 3: RGB)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    size = _peek(Path(path))[1]
    return _decode(Path(path), "L" if channels == 1 else "RGB", size)


# ---- named data sets ------------------------------------------------------------------------------


def named_installed(name: str) -> bool:
    """Whether a named image data set is on this machine (digits ship with scikit-learn)."""
    return name != "fashion-mnist" or (_fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file()


def _fashion_mnist_dir() -> Path:
    # Tests (and unusual installs) point this elsewhere.
    return Path(os.environ.get("AIGC_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")


def _load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    named = NAMED_IMAGES["fashion-mnist"]
    directory = _fashion_mnist_dir()
    prefix = "train" if split == "train" else "t10k"
    files = [directory / f"{prefix}-images-idx3-ubyte.gz", directory / f"{prefix}-labels-idx1-ubyte.gz"]
    for file in files:
        if not file.is_file():
            raise UserError(
                f"data set 'fashion-mnist' needs the Debian package {named.package} ({file} is missing): "
                f"sudo apt-get install {named.package}"
            )
    images = _as_images(_read_idx(files[0]), files[0])
    labels, class_names = _as_labels(_read_idx(files[1]), images.shape[0], files[1], named.classes)
    return images, labels, class_names


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    try:
        from sklearn.datasets import load_digits  # lazy: scikit-learn is only needed here
    except ImportError:
        raise UserError("data set 'digits' needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()  # bundled with the wheel: (1797, 8, 8) floats 0..16, no download
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    part = slice(None, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return images[part], labels[part], NAMED_IMAGES["digits"].classes


# ---- folders --------------------------------------------------------------------------------------


def _load_folder(root: Path, channels: int | None, image_size: int | None, skip: tuple[str, ...] = ()):
    """Images below ``root``, hidden ones skipped; the sub-folders of ``root`` that hold images are classes."""
    files = sorted(
        (p.relative_to(root) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda rel: rel.parts,
    )
    files = [rel for rel in files if not any(part.startswith(".") for part in rel.parts) and rel.as_posix() not in skip]
    if not files:
        raise UserError(f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, in sub-folders too)")
    class_names = tuple(sorted({rel.parts[0] for rel in files if len(rel.parts) > 1}))
    loose = [rel for rel in files if len(rel.parts) == 1]
    if class_names and loose:
        raise UserError(
            f"{root} has class sub-folders ({', '.join(class_names)}) and also images directly in it "
            f"(e.g. {root / loose[0]}): move those into a class sub-folder, or remove them"
        )
    # Pass 1: headers only (PIL opens lazily), to settle the channels and the size before decoding.
    modes, sizes = zip(*(_peek(root / rel) for rel in files), strict=True)
    if image_size is None:
        for rel, size in zip(files, sizes, strict=True):
            if size != sizes[0]:
                raise UserError(
                    f"images differ in size: {root / files[0]} is {sizes[0][0]}x{sizes[0][1]} but {root / rel} is "
                    f"{size[0]}x{size[1]}; give --image-size N to resize them all to N x N"
                )
    if channels is None:
        channels = 1 if all(mode in GRAY_MODES for mode in modes) else 3
    width, height = sizes[0] if image_size is None else (image_size, image_size)
    # Pass 2: decode, convert and resize into one array.
    images = np.empty((len(files), height, width, channels), dtype=np.uint8)
    for i, rel in enumerate(files):
        images[i] = _decode(root / rel, "L" if channels == 1 else "RGB", (width, height))
    if not class_names:
        return images, None, None
    labels = np.array([class_names.index(rel.parts[0]) for rel in files], dtype=np.int64)
    return images, labels, class_names


def _peek(path: Path) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (width, height)) from the header; only a palette image is decoded, to read its palette."""
    try:
        with Image.open(path) as img:
            mode, size = img.mode, img.size
            if mode == "P" and _is_gray(img.getpalette() or []):  # e.g. a grayscale GIF
                mode = "L"
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None
    if mode.startswith(("I", "F")):  # PIL would clip these to 0..255 instead of scaling
        raise UserError(f"{path} is a {mode} (16-bit or float) image: only 8-bit images are supported; convert it")
    return mode, size


def _is_gray(palette: list[int]) -> bool:
    return all(r == g == b for r, g, b in zip(palette[0::3], palette[1::3], palette[2::3], strict=True))


def _decode(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """Decode one image (first frame) to ``mode`` ("L" or "RGB") at ``size``: (H, W, C) uint8."""
    try:
        with Image.open(path) as img:
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL's own advice for palette transparency
            img = img.convert(mode)  # alpha is dropped: RGBA -> RGB, LA -> L
            if img.size != size:
                img = img.resize(size, Image.Resampling.LANCZOS)
            pixels = np.asarray(img)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


# ---- array files ----------------------------------------------------------------------------------


def _load_npz(path: Path):
    """An .npz with images in ``x`` or ``images`` and optional labels in ``y`` or ``labels``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zlib.error) as err:
        raise UserError(f"cannot read {path} as .npz: {err}") from None
    image_keys = [k for k in ("x", "images") if k in arrays]
    label_keys = [k for k in ("y", "labels") if k in arrays]
    if len(image_keys) != 1 or len(label_keys) > 1:
        raise UserError(
            f"{path}: expected one image array named 'x' or 'images' and at most one label array named "
            f"'y' or 'labels'; found arrays: {', '.join(arrays) or 'none'}"
        )
    images = _as_images(arrays[image_keys[0]], path)
    if not label_keys:
        return images, None, None
    labels, class_names = _as_labels(arrays[label_keys[0]], images.shape[0], path)
    return images, labels, class_names


def _load_idx_pair(path: Path):
    """An IDX image file, with labels from the sibling "...-labels-idx1-ubyte[.gz]" when there is one."""
    images = _as_images(_read_idx(path), path)
    gz = path.name.lower().endswith(".gz")
    stem = path.name[:-3] if gz else path.name
    labels_stem = re.sub(r"images([.-])idx3-ubyte$", r"labels\1idx1-ubyte", stem)
    if labels_stem == stem:  # not the standard "...-images-idx3-ubyte" naming
        return images, None, None
    for name in (labels_stem + path.name[len(stem) :], labels_stem + ("" if gz else ".gz")):  # same compression first
        if (path.parent / name).is_file():
            labels, class_names = _as_labels(_read_idx(path.parent / name), images.shape[0], path.parent / name)
            return images, labels, class_names
    return images, None, None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file: magic 0x00 0x00 <type code> <ndim>, ndim big-endian uint32 sizes, then the data."""
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise UserError(
            f"{path} is not an IDX file: bad magic number 0x{data[:4].hex()} (expected 0x0000, a type code 0x08-0x0E "
            "and the number of dimensions)"
        )
    ndim, dtype = data[3], np.dtype(_IDX_DTYPES[data[2]])
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4")) if len(data) >= header else None
    if dims is None or len(data) != header + math.prod(dims) * dtype.itemsize:
        raise UserError(f"{path}: IDX header says shape {dims} of {dtype.name}, but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _as_images(x: np.ndarray, path: Path) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8, or float in [0, 1] -> uint8 (N, H, W, C)."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise UserError(f"{path}: images must be (N, H, W) or (N, H, W, C) with C = 1 or 3 last; got {x.shape}")
    if x.shape[0] == 0:
        raise UserError(f"{path}: holds no images (N = 0)")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{path}: images must be uint8 (0..255) or float in [0, 1]; got {x.dtype}")
    low, high = float(x.min()), float(x.max())
    if not (low >= 0.0 and high <= 1.0):  # also false for NaN
        raise UserError(
            f"{path}: float images must lie in [0, 1], found {low:g}..{high:g}; rescale them or store uint8 0..255"
        )
    return np.rint(x * 255.0).astype(np.uint8)


def _as_labels(y: np.ndarray, n: int, path: Path, class_names: tuple[str, ...] | None = None):
    """Check integer labels (N,); class names default to "0".."max label"."""
    if y.ndim != 1 or y.shape[0] != n:
        raise UserError(f"{path}: {n} images but labels of shape {y.shape} (expected ({n},))")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: labels must be integers, got {y.dtype}")
    if y.min() < 0:
        raise UserError(f"{path}: labels must be 0 or more, found {y.min()}")
    if class_names is None:
        class_names = tuple(str(i) for i in range(int(y.max()) + 1))
    elif y.max() >= len(class_names):
        raise UserError(
            f"{path}: label {y.max()} is out of range for {len(class_names)} classes (0..{len(class_names) - 1})"
        )
    return y.astype(np.int64), class_names


# ---- conversion -----------------------------------------------------------------------------------


def _convert(images: np.ndarray, channels: int | None, image_size: int | None) -> np.ndarray:
    """Convert (N, H, W, C) uint8 to ``channels`` and resize to image_size x image_size (None keeps)."""
    if channels == 3 and images.shape[3] == 1:
        images = np.repeat(images, 3, axis=3)
    elif channels == 1 and images.shape[3] == 3:
        # ITU-R 601-2 luma in PIL's fixed point, so arrays match PIL's convert("L") on folders.
        rgb = images.astype(np.uint32)
        images = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
        images = images.astype(np.uint8)[..., None]
    if image_size is None or images.shape[1:3] == (image_size, image_size):
        return images
    resized = np.empty((images.shape[0], image_size, image_size, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        pixels = np.asarray(pil.resize((image_size, image_size), Image.Resampling.LANCZOS))
        resized[i] = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return resized
