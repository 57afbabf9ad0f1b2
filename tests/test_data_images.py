"""Image data layer: every source (named, folder, npz, IDX), conversions, errors, and the PNG record."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aigc.data.images import (
    NAMED_IMAGES,
    ImageData,
    load_images,
    make_grid,
    random_hflip,
    read_png_record,
    save_png,
    to_tensor,
    to_uint8,
)
from aigc.errors import UserError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray) -> Path:
    """A minimal IDX writer (the format LeCun documents): magic, big-endian dims, data; gzipped for *.gz."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    code = codes[array.dtype]
    data = bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def random_images(n: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Save (H, W) or (H, W, 3|4) uint8 as an image; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A tiny fashion-mnist directory: 6 train and 4 test 28x28 images, via AIGC_FASHION_MNIST_DIR."""
    directory = tmp_path / "fashion"
    directory.mkdir()
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", random_images(n, 28, 28, 1)[..., 0])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8))
    monkeypatch.setenv("AIGC_FASHION_MNIST_DIR", str(directory))
    return directory


# ---- named data sets ------------------------------------------------------------------------------


def test_named_images_registry():
    assert set(NAMED_IMAGES) == {"fashion-mnist", "digits"}
    assert NAMED_IMAGES["fashion-mnist"].package == "dataset-fashion-mnist"
    assert NAMED_IMAGES["fashion-mnist"].classes[0] == "T-shirt/top"
    assert NAMED_IMAGES["fashion-mnist"].classes[9] == "Ankle boot"


def test_fake_fashion_mnist_both_splits(fake_fashion):
    train = load_images("fashion-mnist")
    test = load_images("fashion-mnist", split="test")
    assert train.source == "fashion-mnist"
    assert train.images.shape == (6, 28, 28, 1) and test.images.shape == (4, 28, 28, 1)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.images[..., 0], random_images(6, 28, 28, 1)[..., 0])
    np.testing.assert_array_equal(test.labels, [0, 1, 2, 3])
    assert train.class_names[1] == "Trouser" and train.num_classes == 10
    assert (train.n, train.height, train.width, train.channels) == (6, 28, 28, 1)


def test_fashion_mnist_resize_and_rgb(fake_fashion):
    data = load_images("fashion-mnist", image_size=32, channels=3)
    assert data.images.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(data.images[..., 0], data.images[..., 2])  # gray repeated


def test_fashion_mnist_missing_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"dataset-fashion-mnist.*sudo apt-get install dataset-fashion-mnist"):
        load_images("fashion-mnist")


def test_fashion_mnist_label_out_of_range(fake_fashion):
    write_idx(fake_fashion / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 12], dtype=np.uint8))
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte\.gz: label 12 is out of range for 10 classes"):
        load_images("fashion-mnist")


def test_fashion_mnist_count_mismatch(fake_fashion):
    write_idx(fake_fashion / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(UserError, match=r"4 images but labels of shape \(3,\)"):
        load_images("fashion-mnist", split="test")


@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist absent")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("AIGC_FASHION_MNIST_DIR", raising=False)
    train = load_images("fashion-mnist")
    test = load_images("fashion-mnist", split="test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10  # balanced, as published
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.images.max() == 255 and train.images.min() == 0


def test_digits_split_shape_and_range():
    train = load_images("digits")
    test = load_images("digits", split="test")
    assert train.n == 1500 and test.n == 297 and train.n + test.n == 1797
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert train.images.min() == 0 and train.images.max() == 255
    assert train.class_names == tuple("0123456789") and set(train.labels.tolist()) == set(range(10))
    from sklearn.datasets import load_digits

    reference = load_digits()
    np.testing.assert_array_equal(test.labels, reference.target[1500:])
    np.testing.assert_allclose(train.images[..., 0] / 255 * 16, reference.images[:1500], atol=16 / 255 / 2 + 1e-9)


def test_digits_resize_and_sha256():
    data = load_images("digits", image_size=16)
    assert data.images.shape == (1500, 16, 16, 1)
    assert load_images("digits").sha256 == load_images("digits").sha256
    assert load_images("digits").sha256 != load_images("digits", split="test").sha256


# ---- folders --------------------------------------------------------------------------------------


def test_folder_with_class_subfolders(tmp_path):
    rgb = random_images(5, 6, 7, 3)
    # written out of order; classes sorted by name, files sorted inside them
    write_png(tmp_path / "zebra" / "b.png", rgb[0])
    write_png(tmp_path / "apple" / "2.png", rgb[1])
    write_png(tmp_path / "apple" / "1.PNG", rgb[2])
    write_png(tmp_path / "mango" / "deep" / "x.bmp", rgb[3])
    write_png(tmp_path / "zebra" / "a.png", rgb[4])
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_images(str(tmp_path))
    assert data.source == str(tmp_path.resolve())
    assert data.class_names == ("apple", "mango", "zebra")
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 2, 2])
    assert data.images.shape == (5, 6, 7, 3)
    np.testing.assert_array_equal(data.images, rgb[[2, 1, 3, 4, 0]])  # lossless formats: exact pixels


def test_folder_without_classes_is_unlabelled_and_gray(tmp_path):
    gray = random_images(3, 5, 5, 1)[..., 0]
    for i, name in enumerate(["c.png", "a.png", "b.gif"]):
        write_png(tmp_path / name, gray[i])
    data = load_images(str(tmp_path))
    assert data.labels is None and data.class_names is None and data.num_classes == 0
    assert data.images.shape == (3, 5, 5, 1)
    np.testing.assert_array_equal(data.images[..., 0], gray[[1, 2, 0]])


def test_folder_mixed_modes_become_rgb_and_rgba_drops_alpha(tmp_path):
    gray = random_images(1, 4, 4, 1)[0, :, :, 0]
    rgba = random_images(1, 4, 4, 4, seed=1)[0]
    write_png(tmp_path / "a.png", gray)
    write_png(tmp_path / "b.png", rgba)
    data = load_images(str(tmp_path))
    assert data.channels == 3
    np.testing.assert_array_equal(data.images[0], np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(data.images[1], rgba[..., :3])


def test_folder_colour_gif_is_rgb(tmp_path):
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[:2] = (255, 0, 0)  # two palette entries, red and black: a palette that is not gray
    write_png(tmp_path / "a.gif", colour)
    write_png(tmp_path / "b.png", random_images(1, 4, 4, 1)[0, :, :, 0])
    data = load_images(str(tmp_path))
    assert data.channels == 3
    np.testing.assert_array_equal(data.images[0], colour)


def test_folder_channels_conversion_matches_pil(tmp_path):
    rgb = random_images(2, 4, 4, 3)
    for i in range(2):
        write_png(tmp_path / f"{i}.png", rgb[i])
    gray = load_images(str(tmp_path), channels=1)
    assert gray.images.shape == (2, 4, 4, 1)
    np.testing.assert_array_equal(gray.images[0, :, :, 0], np.asarray(Image.fromarray(rgb[0]).convert("L")))


def test_folder_resize_mixed_sizes_and_formats(tmp_path):
    write_png(tmp_path / "a.png", random_images(1, 10, 20, 3)[0])
    write_png(tmp_path / "b.jpg", random_images(1, 30, 15, 3)[0])
    write_png(tmp_path / "c.webp", random_images(1, 8, 8, 3)[0])
    data = load_images(str(tmp_path), image_size=12)
    assert data.images.shape == (3, 12, 12, 3)
    expected = np.asarray(Image.open(tmp_path / "a.png").resize((12, 12), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(data.images[0], expected)


def test_folder_mixed_sizes_without_image_size(tmp_path):
    write_png(tmp_path / "a.png", random_images(1, 10, 20, 3)[0])
    write_png(tmp_path / "b.png", random_images(1, 10, 20, 3)[0])
    write_png(tmp_path / "c.png", random_images(1, 30, 15, 3)[0])
    with pytest.raises(UserError, match=r"a\.png is 20x10 but .*c\.png is 15x30; give --image-size N"):
        load_images(str(tmp_path))


def test_folder_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"no images under .*empty"):
        load_images(str(tmp_path / "empty"))

    corrupt = tmp_path / "corrupt"
    write_png(corrupt / "good.png", random_images(1, 4, 4, 3)[0])
    (corrupt / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match=r"cannot read image .*corrupt/bad\.png"):
        load_images(str(corrupt))

    truncated = tmp_path / "truncated"
    good = write_png(truncated / "a.png", random_images(1, 64, 64, 3)[0])
    (truncated / "b.png").write_bytes(good.read_bytes()[:200])  # header intact, pixels cut off
    with pytest.raises(UserError, match=r"cannot read image .*truncated/b\.png"):
        load_images(str(truncated))

    loose = tmp_path / "loose"
    write_png(loose / "cat" / "1.png", random_images(1, 4, 4, 3)[0])
    write_png(loose / "stray.png", random_images(1, 4, 4, 3)[0])
    with pytest.raises(UserError, match=r"class sub-folders \(cat\) and also images directly in it .*stray\.png"):
        load_images(str(loose))

    with pytest.raises(UserError, match=r"has no 'test' split"):
        load_images(str(loose / "cat"), split="test")


def test_folder_skips_hidden_files(tmp_path):
    write_png(tmp_path / "a.png", random_images(1, 4, 4, 3)[0])
    (tmp_path / "._a.png").write_bytes(b"AppleDouble metadata, not an image")
    assert load_images(str(tmp_path)).n == 1


def test_sixteen_bit_png_is_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(UserError, match=r"deep\.png is a I;16 .*only 8-bit"):
        load_images(str(tmp_path))


# ---- array files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "faces.idx", "f.idx.gz"])
def test_idx_images(tmp_path, name):
    images = random_images(5, 3, 4, 1)[..., 0]
    data = load_images(str(write_idx(tmp_path / name, images)))
    np.testing.assert_array_equal(data.images[..., 0], images)
    assert data.labels is None


@pytest.mark.parametrize("labels_gz", [True, False])
def test_idx_sibling_labels(tmp_path, labels_gz):
    images = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", random_images(4, 3, 3, 1)[..., 0])
    write_idx(tmp_path / ("t10k-labels-idx1-ubyte" + (".gz" if labels_gz else "")), np.array([3, 0, 1, 3], np.uint8))
    data = load_images(str(images))
    np.testing.assert_array_equal(data.labels, [3, 0, 1, 3])
    assert data.class_names == ("0", "1", "2", "3")


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + bytes(20))
    with pytest.raises(UserError, match=r"bad-images-idx3-ubyte is not an IDX file: bad magic number 0x12340803"):
        load_images(str(bad))
    short = tmp_path / "short.idx"
    short.write_bytes(write_idx(tmp_path / "x.idx", random_images(2, 3, 3, 1)[..., 0]).read_bytes()[:-1])
    with pytest.raises(UserError, match=r"short\.idx: IDX header says shape \(2, 3, 3\)"):
        load_images(str(short))
    broken_gz = tmp_path / "broken.idx.gz"
    broken_gz.write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"cannot read .*broken\.idx\.gz"):
        load_images(str(broken_gz))


def test_npz_uint8_and_float(tmp_path):
    rgb = random_images(4, 5, 5, 3)
    np.savez(tmp_path / "a.npz", x=rgb, y=np.array([1, 0, 1, 2]))
    data = load_images(str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(data.images, rgb)
    np.testing.assert_array_equal(data.labels, [1, 0, 1, 2])
    assert data.class_names == ("0", "1", "2")

    np.savez(tmp_path / "b.npz", images=(rgb[..., 0] / 255.0).astype(np.float32))
    data = load_images(str(tmp_path / "b.npz"))
    assert data.images.shape == (4, 5, 5, 1) and data.labels is None
    np.testing.assert_array_equal(data.images[..., 0], rgb[..., 0])

    data = load_images(str(tmp_path / "a.npz"), channels=1, image_size=3)
    assert data.images.shape == (4, 3, 3, 1)


def test_array_rgb_to_gray_matches_pil(tmp_path):
    rgb = random_images(3, 16, 16, 3)  # 768 random pixels: any rounding or weight slip shows
    np.savez(tmp_path / "a.npz", x=rgb)
    gray = load_images(str(tmp_path / "a.npz"), channels=1).images[..., 0]
    np.testing.assert_array_equal(gray, [np.asarray(Image.fromarray(image).convert("L")) for image in rgb])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.full((2, 3, 3), 2.0)}, r"float images must lie in \[0, 1\], found 2\.\.2"),
        ({"x": np.full((2, 3, 3), np.nan)}, r"float images must lie in \[0, 1\]"),
        ({"x": np.zeros((2, 3, 3), np.int32)}, r"uint8 \(0\.\.255\) or float in \[0, 1\]; got int32"),
        ({"x": np.zeros((2, 1, 5, 5), np.uint8)}, r"C = 1 or 3 last; got \(2, 1, 5, 5\)"),
        ({"x": np.zeros((0, 3, 3), np.uint8)}, r"no images"),
        ({"pixels": np.zeros((2, 3, 3), np.uint8)}, r"named 'x' or 'images'.*found arrays: pixels"),
        ({"x": np.zeros((2, 3, 3), np.uint8), "y": np.zeros(3, np.int64)}, r"2 images but labels of shape \(3,\)"),
        ({"x": np.zeros((2, 3, 3), np.uint8), "y": np.array([0.5, 1.0])}, r"labels must be integers"),
        ({"x": np.zeros((2, 3, 3), np.uint8), "y": np.array([0, -1])}, r"labels must be 0 or more"),
    ],
)
def test_npz_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "data.npz", **arrays)
    with pytest.raises(UserError, match=r"data\.npz: .*" + message):
        load_images(str(tmp_path / "data.npz"))


def test_bad_arguments_and_paths(tmp_path):
    with pytest.raises(UserError, match=r"no such file or directory: .*nope \(and it is not a named data set"):
        load_images(str(tmp_path / "nope"))
    (tmp_path / "a.csv").write_text("1,2")
    with pytest.raises(UserError, match=r"a\.csv: not a folder of images, an \.npz file or an IDX file"):
        load_images(str(tmp_path / "a.csv"))
    with pytest.raises(UserError, match=r"unknown split 'val'"):
        load_images("digits", split="val")
    with pytest.raises(UserError, match=r"channels must be 1 .* or 3"):
        load_images("digits", channels=4)
    with pytest.raises(UserError, match=r"image size must be a positive"):
        load_images("digits", image_size=0)


def test_image_data_checks_its_invariants():
    with pytest.raises(ValueError):
        ImageData("x", np.zeros((2, 3, 3), np.uint8), None, None)
    with pytest.raises(ValueError):
        ImageData("x", np.zeros((2, 3, 3, 1), np.uint8), np.zeros(2, np.int64), None)


# ---- tensors, flips, grids ------------------------------------------------------------------------


def test_to_tensor_to_uint8_round_trip():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    images[0, :, :, 1] = 255 - images[0, :, :, 1]
    x = to_tensor(images)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert x[0, 0, 0, 1].item() == pytest.approx(1 / 127.5 - 1)
    np.testing.assert_array_equal(to_uint8(x), images)
    clipped = to_uint8(torch.tensor([-3.0, 3.0, 0.0]).reshape(1, 1, 1, 3))
    assert clipped.tolist() == [[[[0], [255], [128]]]]


def test_random_hflip_flips_about_half_and_is_seeded():
    x = torch.arange(1000 * 4, dtype=torch.float32).reshape(1000, 1, 1, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).all(dim=(1, 2, 3))
    assert ((out == x).all(dim=(1, 2, 3)) | flipped).all()  # each image whole, either kept or mirrored
    assert 430 < int(flipped.sum()) < 570
    again = random_hflip(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(out, random_hflip(x, torch.Generator().manual_seed(1)))


def test_make_grid_shape_and_placement():
    images = random_images(10, 5, 6, 3)
    grid = make_grid(images)  # ceil(sqrt(10)) = 4 per row, 3 rows
    assert grid.shape == (3 * 5 + 4 * 2, 4 * 6 + 5 * 2, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[2:7, 2:8], images[0])
    np.testing.assert_array_equal(grid[9:14, 10:16], images[5])  # row 1, column 1
    assert make_grid(images, nrow=5, pad=0).shape == (10, 30, 3)
    assert make_grid(images[:1, :, :, :1], pad=1, pad_value=255)[0, 0, 0] == 255


# ---- PNG record ---------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_save_png_round_trip(tmp_path, channels):
    image = random_images(1, 9, 7, channels)[0]
    record = {"run": "runs/诗-1", "family": "diffusion", "seed": 7, "class": "T-shirt/top", "guidance": 3.5,
              "note": "春江花月夜, café", "eta": None}  # fmt: skip
    path = tmp_path / "000.png"
    save_png(path, image, record)
    with Image.open(path) as img:
        assert img.mode == ("L" if channels == 1 else "RGB")
        pixels = np.asarray(img)
        assert list(img.text) == ["aigc"]
    np.testing.assert_array_equal(pixels.reshape(image.shape), image)
    assert read_png_record(path) == record
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file


def test_read_png_record_errors(tmp_path):
    save_png(tmp_path / "plain.png", random_images(1, 3, 3, 3)[0])
    with pytest.raises(UserError, match=r"plain\.png has no 'aigc' generation record"):
        read_png_record(tmp_path / "plain.png")
    write_png(tmp_path / "photo.jpg", random_images(1, 3, 3, 3)[0])
    with pytest.raises(UserError, match=r"photo\.jpg has no 'aigc' generation record"):
        read_png_record(tmp_path / "photo.jpg")
    with pytest.raises(UserError, match=r"cannot read image .*missing\.png"):
        read_png_record(tmp_path / "missing.png")
    save_png(tmp_path / "list.png", random_images(1, 3, 3, 3)[0], record=None)
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("aigc", json.dumps([1, 2]))
    Image.fromarray(random_images(1, 3, 3, 3)[0]).save(tmp_path / "list.png", pnginfo=info)
    with pytest.raises(UserError, match=r"list\.png: the 'aigc' generation record is a JSON list"):
        read_png_record(tmp_path / "list.png")
