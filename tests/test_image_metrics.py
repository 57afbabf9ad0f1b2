"""Image-quality metrics: oracle tests against closed forms, torchmetrics and scipy, and the feature net
trained on scikit-learn's digits (offline, seconds)."""

from __future__ import annotations

import json
import time
from itertools import pairwise

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from typer.testing import CliRunner

from aigc.cli import app
from aigc.data.images import ImageData, load_images, to_tensor
from aigc.evaluate.images import (
    classifier_score,
    extract_features,
    feature_net,
    fid_from_features,
    floors,
    image_metrics,
    kid_from_features,
    memorization,
    precision_recall,
)
from aigc.store import cache_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_images("digits"), load_images("digits", split="test")


@pytest.fixture(scope="module")
def features_home(tmp_path_factory):
    """This module's AIGC_HOME for the cached digits classifier (each test has its own AIGC_HOME)."""
    return tmp_path_factory.mktemp("features_home")


@pytest.fixture(scope="module")
def digits_net(digits, features_home):
    """The digits classifier, trained once for this module in its own AIGC_HOME."""
    train, test = digits
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(features_home))
        t0 = time.perf_counter()
        net, info = feature_net(train, test=test, max_seconds=60)
        info["wall_seconds"] = time.perf_counter() - t0
    return net, info


def gaussian_fid(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with scipy's matrix square root."""
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


# ---- FID and KID ----------------------------------------------------------------------------------


def test_fid_matches_the_closed_form_for_gaussian_features():
    rng = np.random.default_rng(0)
    d = 4
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = a @ a.T + 0.5 * np.eye(d), b @ b.T + 0.5 * np.eye(d)
    x1 = rng.multivariate_normal(mu1, s1, size=200_000)
    x2 = rng.multivariate_normal(mu2, s2, size=200_000)
    fid = fid_from_features(torch.from_numpy(x1), torch.from_numpy(x2))
    # exactly the closed form on the sample moments ...
    sample = gaussian_fid(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    assert fid == pytest.approx(sample, rel=1e-6)
    # ... and close to it on the true parameters the features were drawn from
    assert fid == pytest.approx(gaussian_fid(mu1, s1, mu2, s2), rel=0.03)


def test_fid_equals_torchmetrics_with_the_net_as_custom_extractor(digits_net, digits):
    """Our path (features once, then torchmetrics on them) equals torchmetrics running the net itself."""
    from torch import nn
    from torchmetrics.image.fid import FrechetInceptionDistance

    net, _ = digits_net
    real, fake = to_tensor(digits[0].images[:400]), to_tensor(digits[1].images)

    class Extractor(nn.Module):
        num_features = net.num_features

        def forward(self, x):
            return net.features(x)

    reference = FrechetInceptionDistance(feature=Extractor())
    with torch.no_grad():
        reference.update(real, real=True)
        reference.update(fake, real=False)
    ours = image_metrics(real, fake, net)["fid"]
    assert ours == pytest.approx(float(reference.compute()), rel=1e-4)


def test_fid_and_kid_are_zero_for_identical_sets_and_grow_with_noise(digits_net, digits):
    net, _ = digits_net
    x = to_tensor(digits[0].images[:400])  # 400 <= KID's subset size: every KID subset is the whole set
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    fids, kids = [], []
    for std in (0.0, 0.1, 0.2, 0.4, 0.8):
        m = image_metrics(x, x + std * noise, net)
        fids.append(m["fid"])
        kids.append(m["kid"])
    # features are standardised (unit variance per dimension), so FID is on a scale of ~num_features
    assert abs(fids[0]) < 1e-3
    assert all(a < b for a, b in pairwise(fids)), fids
    assert all(a < b for a, b in pairwise(kids)), kids
    # KID's unbiased estimator on a set against itself is not exactly 0 but -O(1/N): with every subset
    # the whole set, 2 (mean of k(x, y) over x != y - mean over all pairs), k the cubic kernel of torchmetrics
    f = extract_features(net, x).double()
    kernel = (f @ f.T / f.shape[1] + 1) ** 3
    n = len(f)
    offdiag = (kernel.sum() - kernel.diagonal().sum()) / (n * (n - 1))
    assert kids[0] == pytest.approx(float(2 * (offdiag - kernel.mean())), rel=1e-4)
    assert abs(kids[0]) < 2 / n * kernel.diagonal().mean()  # ~0 on the kernel's scale


def test_kid_of_two_halves_of_one_set_is_about_zero(digits_net, digits):
    net, _ = digits_net
    f = extract_features(net, to_tensor(digits[0].images))
    far = kid_from_features(f[:700], f[700:1400] + 1.0, subset_size=300)[0]
    kid, kid_std = kid_from_features(f[:700], f[700:1400], subset_size=300)
    assert abs(kid) < 3 * kid_std + 0.01 * far
    again = kid_from_features(f[:700], f[700:1400], subset_size=300, seed=1)
    assert again == kid_from_features(f[:700], f[700:1400], subset_size=300, seed=1)


def test_kid_subset_size_follows_the_sample_count():
    f = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    kid, kid_std = kid_from_features(f[:25], f[25:])  # default subset size 1000 > 25: lowered to 25
    assert np.isfinite(kid) and kid_std < 1e-9  # every "subset" is the whole set


# ---- precision and recall ------------------------------------------------------------------------


def _blob(n, center, seed, d=8):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + torch.tensor(center)


def test_precision_recall_identical_sets():
    x = _blob(500, [0.0] * 8, 0)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_precision_recall_far_blob():
    precision, recall = precision_recall(_blob(500, [0.0] * 8, 0), _blob(500, [50.0] * 8, 1))
    assert precision == 0.0 and recall == 0.0


def test_precision_recall_one_mode_of_two():
    # 2-D: with k = 3 the k-NN balls of 500 points cover a 2-D blob well (in high dimensions even a
    # second sample of the same distribution falls partly outside them)
    real = torch.cat([_blob(500, [0.0, 0.0], 0, d=2), _blob(500, [30.0, 30.0], 1, d=2)])
    fake = _blob(1000, [0.0, 0.0], 2, d=2)  # all fakes in the first mode
    precision, recall = precision_recall(real, fake)
    assert precision > 0.9
    assert recall == pytest.approx(0.5, abs=0.05)


def test_precision_recall_k_must_fit():
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(torch.zeros(3, 2), torch.zeros(3, 2), k=3)


# ---- classifier score ----------------------------------------------------------------------------


def test_classifier_score_bounds():
    k = 7
    assert classifier_score(torch.full((70, k), 1 / k)) == pytest.approx(1.0)
    assert classifier_score(torch.eye(k).repeat(10, 1)) == pytest.approx(float(k))
    assert classifier_score(torch.eye(k)[torch.zeros(70, dtype=torch.long)]) == pytest.approx(1.0)  # one class


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save:UserWarning", "ignore:std:UserWarning")
def test_classifier_score_equals_torchmetrics_inception_score():
    from torch import nn
    from torchmetrics.image.inception import InceptionScore

    class Logits(nn.Module):  # torchmetrics applies the softmax to what the extractor returns
        def forward(self, x):
            return x

    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0)) * 3
    reference = InceptionScore(feature=Logits(), splits=1)
    reference.update(logits)
    assert classifier_score(logits.softmax(-1)) == pytest.approx(float(reference.compute()[0]), rel=1e-5)


# ---- the feature net -----------------------------------------------------------------------------


def test_feature_net_on_digits_is_accurate_and_fast(digits_net):
    net, info = digits_net
    assert info["kind"] == "classifier" and info["num_features"] == net.num_features
    assert info["test_accuracy"] > 0.9
    assert not info["stopped_early"]
    assert info["wall_seconds"] < 60


def test_feature_net_is_cached_and_deterministic(digits_net, digits):
    net, _ = digits_net
    train = digits[0]
    t0 = time.perf_counter()
    fresh, info = feature_net(train)  # this test's own AIGC_HOME: trains again, same seed
    assert info["cached"] is False
    first_seconds = time.perf_counter() - t0
    files = sorted(p.name for p in (cache_dir() / "features" / train.sha256[:16]).iterdir())
    assert files == ["seed0.json", "seed0.safetensors"]
    for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # deterministic for a seed
    t0 = time.perf_counter()
    loaded, info = feature_net(train)
    assert info["cached"] is True and time.perf_counter() - t0 < max(1.0, first_seconds / 5)
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = to_tensor(train.images[:64])
    assert torch.equal(extract_features(net, x), extract_features(loaded, x))


def test_unlabelled_data_gets_an_autoencoder(digits):
    train, test = digits
    unlabelled = ImageData("unlabelled digits", train.images[:600], None, None)
    net, info = feature_net(unlabelled, test=ImageData("t", test.images, None, None))
    assert info["kind"] == "autoencoder" and net.kind == "autoencoder"
    assert info["test_accuracy"] is None and 0 < info["test_mse"] < 0.1  # pixels span [-1, 1]: variance ~0.5
    real, fake = to_tensor(train.images[:300]), to_tensor(test.images)
    m = image_metrics(real, fake, net)
    assert m["feature_net"] == "autoencoder" and m["classifier_score"] is None
    assert np.isfinite(m["fid"]) and m["fid"] > 0
    with pytest.raises(TypeError, match="autoencoder"):
        net(real)


def test_wrong_image_shape_is_a_clear_error(digits_net):
    net, _ = digits_net
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        image_metrics(torch.zeros(4, 1, 28, 28), torch.zeros(4, 1, 28, 28), net)


# ---- memorization, per-class FID, floors ---------------------------------------------------------


def test_memorization_rule():
    train = _blob(400, [0.0] * 8, 0)
    heldout = _blob(200, [0.0] * 8, 1)
    copies = memorization(train[:100].clone(), train, heldout)
    assert copies["memorization_rate"] == 1.0 and copies["nn_distance_mean"] == pytest.approx(0.0, abs=1e-2)
    fresh = memorization(_blob(500, [0.0] * 8, 2), train, heldout)
    assert fresh["memorization_rate"] < 0.15
    assert fresh["nn_distance_mean"] == pytest.approx(fresh["heldout_nn_distance_mean"], rel=0.1)


def test_memorization_on_digits(digits_net, digits):
    net, _ = digits_net
    train, test = to_tensor(digits[0].images), to_tensor(digits[1].images)
    heldout, unseen = test[:150], test[150:]
    copied = image_metrics(train[:200], train[:200], net, train_for_memorization=train, heldout=heldout)
    assert copied["memorization_rate"] > 0.95
    fresh = image_metrics(train[:147], unseen, net, train_for_memorization=train, heldout=heldout)
    assert fresh["memorization_rate"] < 0.2
    assert fresh["nn_distance_mean"] > copied["nn_distance_mean"]


def test_fid_per_class_and_floors(digits_net, digits):
    net, _ = digits_net
    train, test = digits
    x_train, x_test = to_tensor(train.images), to_tensor(test.images)
    m = image_metrics(x_train[:600], x_test, net, real_labels=train.labels[:600], fake_labels=test.labels)
    assert sorted(m["fid_per_class"]) == list(range(10)) and all(v > 0 for v in m["fid_per_class"].values())
    assert m["classifier_score"] > 7  # the test digits are recognisable and balanced over 10 classes

    floor = floors(x_train, x_test, net, 2000, train_labels=train.labels, heldout_labels=test.labels)
    assert floor["n"] == len(x_test)  # lowered to the held-out set's size
    assert floor["precision"] > 0.5 and floor["recall"] > 0.5
    assert floor["memorization_rate"] == pytest.approx(0.05, abs=0.02)  # ~5% by construction
    # a generator that adds noise scores worse than the floor
    noisy = image_metrics(x_train[:297], x_test + 0.5 * torch.randn_like(x_test), net)
    assert noisy["fid"] > 2 * floor["fid"]
    assert noisy["precision"] < floor["precision"]


# ---- aigc eval --images FOLDER --data DATASET ----------------------------------------------------


def write_pngs(folder, images, labels=None):
    """uint8 (N, H, W, 1) images as folder/000.png ..., or folder/<label>/NNN.png with labels."""
    for i, image in enumerate(images):
        target = folder if labels is None else folder / str(labels[i])
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[:, :, 0], mode="L").save(target / f"{i:03d}.png")
    return folder


def eval_images(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


@pytest.fixture
def cached_net_home(digits_net, features_home, monkeypatch):
    """Run the CLI in the home whose feature-net cache holds the module's digits classifier."""
    monkeypatch.setenv("AIGC_HOME", str(features_home))
    return features_home


def test_eval_images_scores_a_folder_like_a_run(digits, cached_net_home, tmp_path):
    """Held-out digits score near the floor, copies of training digits are flagged as memorised, noise is far off."""
    train, test = digits
    # the second half of the test split, in class sub-folders: the first N held-out images are the reference
    real = write_pngs(tmp_path / "real", test.images[150:], test.labels[150:])
    copies = write_pngs(tmp_path / "copies", train.images[:200])
    noise = write_pngs(tmp_path / "noise", np.random.default_rng(0).integers(0, 256, (150, 8, 8, 1), dtype=np.uint8))
    scores = {}
    for name, folder in (("real", real), ("copies", copies), ("noise", noise)):
        result = eval_images("--images", folder, "--data", "digits", "--json")
        assert result.exit_code == 0, result.output
        scores[name] = json.loads(result.stdout)
    out = scores["real"]
    assert list(out) == ["images", "data", "metrics", "n", "feature_net"]
    assert out["images"] == str(real) and out["data"] == "digits" and out["n"] == 147
    assert out["feature_net"]["kind"] == "classifier" and out["feature_net"]["cached"] is True
    m = out["metrics"]
    assert set(m) >= {"fid", "fid_floor", "kid", "kid_std", "kid_floor", "precision", "recall", "classifier_score",
                      "memorization_rate", "precision_floor", "recall_floor"}
    # measured: FID 4.05 against a floor of 3.57; copies 2.0 (floor 2.0); noise 29 (floor 3.8)
    assert m["fid"] < 1.5 * m["fid_floor"]
    assert sorted(m["fid_per_class"], key=int) == [str(c) for c in range(10)]  # sub-folders named as the classes
    assert m["memorization_rate"] < 0.2 and m["classifier_score"] > 6
    assert scores["copies"]["n"] == 200 and scores["copies"]["metrics"]["fid_per_class"] is None
    assert scores["copies"]["metrics"]["memorization_rate"] > 0.9  # training images: flagged
    noisy = scores["noise"]["metrics"]
    assert noisy["fid"] > 4 * noisy["fid_floor"] and noisy["fid"] > 4 * m["fid"]
    assert noisy["precision"] < 0.5 * noisy["precision_floor"] and noisy["classifier_score"] < 3
    assert sorted(p.name for p in real.iterdir()) == [str(c) for c in range(10)]  # nothing written into it


def test_eval_images_leaves_out_the_generate_grids_and_writes_out(digits, cached_net_home, tmp_path):
    """Folders laid out by `aigc generate --out` (000.png ... and grid.png), one per class or one in all:
    the grids are no samples. Also -n and --out."""
    _, test = digits
    by_class = tmp_path / "generated"
    for c in (3, 7):
        write_pngs(by_class / str(c), test.images[test.labels == c][:6])
        Image.fromarray(np.zeros((50, 50), np.uint8), mode="L").save(by_class / str(c) / "grid.png")
    result = eval_images("--images", by_class, "--data", "digits", "--json", "--out", tmp_path / "scores.json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["n"] == 12  # not 14
    assert {"3", "7"} <= set(out["metrics"]["fid_per_class"])  # the sub-folders' classes (and the reals')
    assert json.loads((tmp_path / "scores.json").read_text()) == out
    flat = write_pngs(tmp_path / "flat", test.images[:12])
    Image.fromarray(np.zeros((50, 50), np.uint8), mode="L").save(flat / "grid.png")
    result = eval_images("--images", flat, "--data", "digits", "-n", 5)
    assert result.exit_code == 0, result.output
    assert "n_fake" in result.stdout and "5 images of" in result.stderr
    result = eval_images("--images", flat, "--data", "digits", "--json")
    assert json.loads(result.stdout)["n"] == 12


@pytest.mark.parametrize("args, message, code", [
    (["--images", "MISSING", "--data", "digits"], "no such folder", 1),
    (["--images", "EMPTY", "--data", "digits"], "no images under", 1),
    (["--images", "UNREADABLE", "--data", "digits"], "cannot read image", 1),
    (["--images", "TWO", "--data", "digits"], "2 images are too few", 1),
    (["--images", "TWO", "--data", "no-such-data"], "not a named data set", 1),
    (["--images", "TWO", "--data", "digits", "-n", "2"], "-n must be at least 3", 1),
    (["--images", "TWO"], "--images needs --data", 1),
    (["some-run", "--images", "TWO", "--data", "digits"], "not both", 1),
    (["some-run", "--data", "digits"], "--data applies to --images", 1),
    (["some-run", "--out", "x.json"], "--out applies to --images", 1),
    ([], "missing RUN", 2),
])
def test_eval_images_errors(args, message, code, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "0.png").write_bytes(b"not a png")
    write_pngs(tmp_path / "two", np.zeros((2, 8, 8, 1), np.uint8))
    subst = {name: tmp_path / name.lower() for name in ("MISSING", "EMPTY", "UNREADABLE", "TWO")}
    result = eval_images(*[subst.get(a, a) for a in args])
    assert result.exit_code == code
    assert message in result.stderr and "Traceback" not in result.stderr

