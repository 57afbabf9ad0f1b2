"""Continuing from a run (`aigc train --init-from RUN`) for every gradient-trained family: the new run starts from
the run's weights (and EMA weights) exactly, keeps training them with a fresh optimizer, maps a char vocabulary onto
its own, and refuses what cannot continue (another family, an architecture key, other image shapes or classes)
before anything is written."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from aigc import service
from aigc.cli import app
from aigc.config import build, fields_of
from aigc.data.tokenizer import UNK, TextTokenizer
from aigc.errors import BadRequest, NotFound, UserError
from aigc.modalities import MODALITIES, image, text
from aigc.models import FAMILIES
from aigc.store import read_run
from conftest import TINY_SETS, make_poems

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES_CONTINUED = ["rnn", "gpt", "vae", "dcgan", "diffusion"]
ARCH = {  # the [model] keys of a tiny parent: with --init-from they come from it
    **{family: {k: v for k, v in TINY_SETS[family].items() if k in fields_of(FAMILIES[family].config)}
       for family in ("rnn", "gpt")},
    "vae": {"z_dim": "4", "base_channels": "8"},
    "dcgan": {"z_dim": "4", "base_channels": "8"},
    "diffusion": {"base_channels": "8", "depth": "1", "res_blocks": "1", "attention": "false"},
}
TRAIN = {  # the other keys, given to parent and child alike
    **{family: {k: v for k, v in TINY_SETS[family].items() if k not in ARCH[family]} for family in ("rnn", "gpt")},
    **{family: {"batch_size": "8", "eval_interval": "3", "warmup_steps": "1", "dtype": "fp32", "log_interval": "1"}
       for family in ("vae", "dcgan", "diffusion")},
}
LR = 1e-6  # the child's: lr must be > 0, and one AdamW step moves a weight by at most lr (plus its decay)


def write_images(root, classes: dict[str, int], *, side: int = 8, per_class: int = 12) -> str:
    """Grayscale side x side PNGs of noise around a level per class, in class sub-folders (none: `root` itself)."""
    rng = np.random.default_rng(0)
    for name, level in classes.items():
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(level, 10, (side, side)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:02d}.png")
    return str(root)


@pytest.fixture
def shapes(tmp_path):
    return write_images(tmp_path / "shapes", {"bright": 220, "dark": 30})


def data_for(family: str, poems_file, shapes) -> str:
    return shapes if FAMILIES[family].modality == "image" else str(poems_file)


def parent_sets(family: str) -> dict[str, str]:
    conditional = {"conditional": "true"} if FAMILIES[family].modality == "image" else {}
    return {**ARCH[family], **TRAIN[family], **conditional}


def all_weights(family: str, model) -> dict[str, torch.Tensor]:
    """Every tensor the model saves: parameters, buffers (BatchNorm statistics) and the EMA weights."""
    weights = dict(model.state_dict())
    if FAMILIES[family].after_step:
        weights.update(model.ema.tensors())
    return weights


def capture_fit(monkeypatch, family: str) -> list:
    """Record a copy of each model the modality's `fit` is given, before it trains."""
    modality = MODALITIES[FAMILIES[family].modality]
    real, models = modality.fit, []

    def fit(fam, prepared, *args):
        models.append(copy.deepcopy(prepared.model))
        return real(fam, prepared, *args)

    monkeypatch.setattr(modality, "fit", fit)
    return models


# --------------------------------------------------------------------------------------------------------------------
# the child starts where the parent ended


@pytest.mark.parametrize("family", FAMILIES_CONTINUED)
def test_a_continued_run_starts_from_the_parent_weights_and_trains_on(family, poems_file, shapes, monkeypatch):
    fam = FAMILIES[family]
    data = data_for(family, poems_file, shapes)
    parent_dir, _ = service.train(family, data, name="parent", max_steps=3, sets=parent_sets(family))
    parent = fam.load(parent_dir)
    started = capture_fit(monkeypatch, family)
    # by name, no [model] key, no --conditional: the architecture and the classes are the parent's
    child_dir, metrics = service.train(family, data, name="child", max_steps=1, init_from="parent",
                                       sets={**TRAIN[family], "lr": str(LR)})

    # 1. the model the loop was given is the parent's, bit for bit (EMA weights and their count included)
    (child,) = started
    expected, got = all_weights(family, parent), all_weights(family, child)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    if fam.after_step:
        assert child.ema.updates == parent.ema.updates == 3
    if fam.modality == "image":  # the same seed samples the same images (dcgan, diffusion: from the EMA weights)
        y = torch.tensor([0, 1, 0, 1])
        first = parent.sample(4, generator=torch.Generator().manual_seed(5), y=y)
        assert torch.equal(child.sample(4, generator=torch.Generator().manual_seed(5), y=y), first)

    # 2. one step of lr 1e-6 later the weights are still the parent's to within lr (a fresh model is nowhere near),
    # and they moved: the run trained the parent's weights
    final = fam.load(child_dir)
    moved = False
    for name, p in parent.named_parameters():
        q = dict(final.named_parameters())[name]
        torch.testing.assert_close(q, p, rtol=1e-5, atol=2 * LR, msg=name)
        moved |= not torch.equal(q, p)
    assert moved and metrics["steps"] == 1

    # 3. recorded: the parent's absolute path, its architecture in config.toml, a line in the model card
    record = read_run(child_dir)
    assert record["init_from"] == str(parent_dir.resolve())
    assert read_run(parent_dir)["init_from"] is None
    assert (child_dir / "config.toml").read_text().split("[data]")[0] == \
        (parent_dir / "config.toml").read_text().split("[data]")[0]  # [run] and [model]
    assert f"--init-from {parent_dir.resolve()}" in (child_dir / "README.md").read_text()


def test_config_toml_model_section_is_the_parents(poems_file):
    """Not only the keys given to the parent: a default the parent ran with stays the parent's value."""
    service.train("rnn", str(poems_file), name="parent", max_steps=1, sets={**parent_sets("rnn"), "cell": "lstm"})
    child_dir, _ = service.train("rnn", str(poems_file), name="child", max_steps=1, init_from="parent",
                                 sets={**TRAIN["rnn"], "dropout": "0.3"})
    config = (child_dir / "config.toml").read_text()
    assert 'cell = "lstm"' in config and "n_hidden = 32" in config and "dropout = 0.3" in config
    assert FAMILIES["rnn"].config().n_hidden != 32  # not the default: the parent's
    assert FAMILIES["rnn"].load(child_dir).config.dropout == 0.3  # a regularisation key stays the run's own


def test_the_rnn_maps_its_own_characters_onto_the_parents(poems_file, tmp_path):
    """A char child keeps its own vocabulary: each character's embedding and output row (weights and bias) are the
    parent's, the parent's <unk> rows for characters the parent never saw (as gpt does)."""
    parent_dir, _ = service.train("rnn", str(poems_file), name="parent", max_steps=2, sets=parent_sets("rnn"))
    new_data = tmp_path / "new.txt"
    docs = ["Ωμέγα and ψ: characters the parent never read.", "月光 ψ 春风", *make_poems(10, seed=1)]
    new_data.write_text("\n%\n".join(docs) + "\n", encoding="utf-8")
    fam = FAMILIES["rnn"]
    configs = build(text.sections(fam), TRAIN["rnn"], family="rnn")
    # what `aigc optimize` will call: the modality's prepare, with the parent's directory
    prepared = text.prepare("rnn", fam, str(new_data), None, str(parent_dir), configs, dict(TRAIN["rnn"]))
    parent, child = fam.load(parent_dir), prepared.model
    old, new = TextTokenizer.load(parent_dir), prepared.state["tokenizer"]
    old_vocab = old.tokenizer.get_vocab()
    shared, unseen = 0, 0
    for token, i in new.tokenizer.get_vocab().items():
        j = old_vocab.get(token, old_vocab[UNK])
        shared, unseen = shared + (token in old_vocab), unseen + (token not in old_vocab)
        assert torch.equal(child.wte.weight[i], parent.wte.weight[j]), token
        assert torch.equal(child.lm_head.weight[i], parent.lm_head.weight[j]), token
        assert torch.equal(child.lm_head.bias[i], parent.lm_head.bias[j]), token
    assert shared > 10 and unseen > 10 and "ψ" not in old_vocab
    assert child.config.vocab_size == new.vocab_size != old.vocab_size
    assert child.wte.weight.shape[0] == child.lm_head.weight.shape[0] == new.vocab_size
    assert prepared.record["vocab_from_checkpoint"] == {"tokens": new.vocab_size, "found": shared}
    # the recurrent core is the parent's unchanged
    assert all(torch.equal(p, dict(parent.core.named_parameters())[n]) for n, p in child.core.named_parameters())


def test_an_image_run_may_set_its_regularisation_keys_and_keeps_the_weights_and_ema(shapes):
    """Diffusion's dropout and cond_drop stay the run's own: the model is rebuilt with them, holding the parent's
    weights, EMA weights and EMA count."""
    fam = FAMILIES["diffusion"]
    parent_dir, _ = service.train("diffusion", shapes, name="parent", max_steps=2, sets=parent_sets("diffusion"))
    values = {**TRAIN["diffusion"], "dropout": "0.2", "cond_drop": "0.3"}
    configs = build(image.sections(fam), values, family="diffusion")
    prepared = image.prepare("diffusion", fam, shapes, None, str(parent_dir), configs, values)
    parent, child = fam.load(parent_dir), prepared.model
    expected, got = all_weights("diffusion", parent), all_weights("diffusion", child)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert child.ema.updates == parent.ema.updates == 2
    assert (child.config.dropout, child.config.cond_drop) == (0.2, 0.3) == (configs["model"].dropout,
                                                                            configs["model"].cond_drop)
    assert {m.p for m in child.unet.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}
    assert child.config.base_channels == 8 and configs["data"].conditional  # the parent's, not given


def test_a_bpe_parent_gives_its_tokenizer_unchanged(poems_file):
    sets = {**parent_sets("rnn"), "tokenizer": "bpe", "bpe_vocab_size": "300"}
    parent_dir, _ = service.train("rnn", str(poems_file), name="parent", max_steps=1, sets=sets)
    child_dir, _ = service.train("rnn", str(poems_file), name="child", max_steps=1, init_from=str(parent_dir),
                                 sets=TRAIN["rnn"])
    assert (child_dir / "tokenizer.json").read_text() == (parent_dir / "tokenizer.json").read_text()
    assert "vocab_from_checkpoint" not in read_run(child_dir)


def test_resume_of_a_continued_run_continues_it_exactly(shapes):
    """A continued run interrupted after 2 steps and resumed to 4 ends where 4 steps in one go end."""
    service.train("dcgan", shapes, name="parent", max_steps=3, sets=parent_sets("dcgan"))
    service.train("dcgan", shapes, name="straight", max_steps=4, init_from="parent", sets=TRAIN["dcgan"])
    service.train("dcgan", shapes, name="halves", max_steps=2, init_from="parent", sets=TRAIN["dcgan"])
    run_dir, metrics = service.train("dcgan", shapes, name="halves", max_steps=4, resume=True)
    a = load_file(run_dir.parent / "straight" / "model.safetensors")
    b = load_file(run_dir / "model.safetensors")
    assert set(a) == set(b) and any(k.startswith("ema.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert metrics["steps"] == 4 and read_run(run_dir)["init_from"] == str((run_dir.parent / "parent").resolve())


# --------------------------------------------------------------------------------------------------------------------
# what cannot continue: one clear error, and nothing written


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """A conditional vae and an unconditional dcgan on 8x8 shapes (bright, dark), and an rnn, in a home of their own."""
    import os

    from conftest import TINY_SETS as tiny_sets

    root = tmp_path_factory.mktemp("parents")
    shapes_dir = write_images(root / "shapes", {"bright": 220, "dark": 30})
    poems = root / "poems.txt"
    poems.write_text("\n%\n".join(make_poems()) + "\n", encoding="utf-8")
    old = os.environ.get("AIGC_HOME")
    os.environ["AIGC_HOME"] = str(root / "home")
    try:
        runs = {"vae": service.train("vae", shapes_dir, name="vae", max_steps=1, sets=parent_sets("vae"))[0],
                "dcgan": service.train("dcgan", shapes_dir, name="dcgan", max_steps=1,
                                       sets={**ARCH["dcgan"], **TRAIN["dcgan"]})[0],
                "rnn": service.train("rnn", str(poems), name="rnn", max_steps=1, sets=tiny_sets["rnn"])[0]}
    finally:
        if old is None:
            os.environ.pop("AIGC_HOME")
        else:
            os.environ["AIGC_HOME"] = old
    return runs


BAD = {  # family, data, parent, extra arguments -> error type, the words of its message
    "another family's run": ("dcgan", "{shapes}", "vae", [],
                             BadRequest, ["'vae' is a vae run; a dcgan run continues only from a dcgan run"]),
    "an image run for a text family": ("rnn", "{poems}", "vae", [],
                                       BadRequest, ["'vae' is a vae run; an rnn run continues only from an rnn run"]),
    "an architecture key": ("vae", "{shapes}", "vae", ["--set", "z_dim=8"],
                            BadRequest, ["z_dim comes from the --init-from checkpoint", "may set beta"]),
    "an rnn architecture key": ("rnn", "{poems}", "rnn", ["--set", "n_hidden=64"],
                                BadRequest, ["n_hidden comes from the --init-from checkpoint", "may set dropout"]),
    "the tokenizer": ("rnn", "{poems}", "rnn", ["--set", "tokenizer=bpe"],
                      BadRequest, ["tokenizer comes from the --init-from checkpoint"]),
    "a dcgan key": ("dcgan", "{shapes}", "dcgan", ["--set", "ema_decay=0.9"],
                    BadRequest, ["ema_decay comes from the --init-from checkpoint"]),
    "another image size": ("vae", "{big}", "vae", [],
                           BadRequest, ["'vae' was trained on images of 1 x 8 x 8", "1 x 12 x 12",
                                        "--image-size 8"]),
    "RGB for grayscale": ("vae", "{rgb}", "vae", [], BadRequest, ["1 x 8 x 8", "3 x 8 x 8", "--set channels=1"]),
    "more classes": ("vae", "{three}", "vae", [],
                     BadRequest, ["the classes bright, dark", "bright, dark, grey", "same classes"]),
    "other class names": ("vae", "{renamed}", "vae", [], BadRequest, ["the classes bright, dark", "dark, light"]),
    "no classes": ("vae", "{flat}", "vae", [], BadRequest, ["'vae' is conditional (2 classes)", "no class labels"]),
    "conditional from unconditional": ("dcgan", "{shapes}", "dcgan", ["--conditional"],
                                       BadRequest, ["conditional comes from the --init-from checkpoint",
                                                    "'dcgan' is unconditional"]),
    "a missing run": ("vae", "{shapes}", "ghost", [], NotFound, ["--init-from: no such run: 'ghost'"]),
    "a missing run for a text family": ("rnn", "{poems}", "ghost", [],
                                        NotFound, ["no such run: 'ghost'", "nor a model folder"]),
    "a series": ("rnn", "sunspots", "rnn", [], BadRequest, ["--init-from does not apply to rnn on a series"]),
}


@pytest.fixture
def bad_data(tmp_path, poems_file, parents):
    return {"shapes": write_images(tmp_path / "shapes", {"bright": 220, "dark": 30}),
            "big": write_images(tmp_path / "big", {"bright": 220, "dark": 30}, side=12),
            "three": write_images(tmp_path / "three", {"bright": 220, "dark": 30, "grey": 120}),
            "renamed": write_images(tmp_path / "renamed", {"dark": 30, "light": 220}),
            "flat": write_images(tmp_path / "flat", {"": 120}),
            "rgb": _rgb_images(tmp_path / "rgb"), "poems": str(poems_file)}


def _rgb_images(root) -> str:
    for name in ("bright", "dark"):
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8), mode="RGB").save(root / name / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("case", list(BAD))
def test_what_cannot_continue_is_one_clear_error_before_anything_is_written(case, parents, bad_data, aigc_home):
    family, data, parent, extra, error, words = BAD[case]
    data = data.format(**bad_data)
    init_from = str(parents[parent]) if parent in parents else parent
    sets = dict(TRAIN[family])
    sets.update(dict(a.split("=", 1) for a in extra[1::2] if "=" in a))
    with pytest.raises(error) as raised:
        service.train(family, data, name="child", max_steps=1, init_from=init_from,
                      sets={**sets, **({"conditional": "true"} if "--conditional" in extra else {})})
    for word in words:
        assert word in str(raised.value)

    args = ["train", "--family", family, "--data", data, "--name", "child", "--max-steps", "1",
            "--init-from", init_from, *extra]
    for key, value in TRAIN[family].items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(word in lines[0] for word in words), lines
    assert not (aigc_home / "runs").exists() or list((aigc_home / "runs").iterdir()) == []


def test_a_run_cannot_continue_from_itself(parents, aigc_home, shapes):
    run_dir = shutil.copytree(parents["vae"], aigc_home / "runs" / "vae")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(BadRequest, match="'vae' is the run --overwrite would replace"):
        service.train("vae", shapes, name="vae", overwrite=True, max_steps=1, init_from="vae", sets=TRAIN["vae"])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_text_folder_that_is_not_an_rnn_model_is_refused(poems_file, tmp_path, parents):
    """gpt reads any GPT-2 folder; the rnn refuses a folder that holds another model (here: a GPT-2 config)."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    shutil.copy(parents["rnn"] / "tokenizer.json", folder / "tokenizer.json")
    with pytest.raises(UserError, match="holds a gpt2 model, not an rnn"):
        service.train("rnn", str(poems_file), name="child", max_steps=1, init_from=str(folder), sets=TRAIN["rnn"])


def test_every_family_that_continues_says_so_in_the_registry():
    continued = [name for name, fam in FAMILIES.items() if fam.init_from]
    assert continued == ["rnn", "gpt", "vae", "dcgan", "diffusion", "simvp", "vae-rnn"]
    for name in continued:
        fam = FAMILIES[name]
        assert set(fam.init_keys) <= set(fields_of(fam.config)), name
        assert (fam.load_pretrained is not None) == (fam.modality == "text"), name
