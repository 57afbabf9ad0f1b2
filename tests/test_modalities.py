"""The modality contract (aigc.modalities.base.Modality), checked on every registered modality as
scikit-learn's check_estimator checks estimators; and the service's model cache."""

from __future__ import annotations

import inspect

import pytest

from aigc import service
from aigc.errors import BadRequest, Conflict, UserError
from aigc.fsutil import write_json
from aigc.modalities import MODALITIES, Modality
from aigc.models import FAMILIES
from aigc.store import read_run
from conftest import TINY_SETS

STAGES = [name for name, value in vars(Modality).items() if inspect.isfunction(value) and not name.startswith("_")]


@pytest.mark.parametrize("name", sorted(MODALITIES))
def test_every_modality_implements_the_protocol_with_its_signatures(name):
    module = MODALITIES[name]
    assert isinstance(module, Modality)
    assert module.NAME == name
    for stage in STAGES:
        declared = list(inspect.signature(getattr(Modality, stage)).parameters)[1:]  # without self
        assert list(inspect.signature(getattr(module, stage)).parameters) == declared, f"{name}.{stage}"


def test_every_family_belongs_to_a_modality_that_has_its_sections():
    for family, fam in FAMILIES.items():
        name, variant = service.modality_for(family)
        assert name == fam.modality and name in MODALITIES
        sections = MODALITIES[name].sections(variant)
        assert {"model", "data"} <= set(sections) and ("train" in sections) == (variant.trainer == "gradient")


def test_options_of_another_modality_say_whose_they_are(poems_file):
    service.train("ngram", str(poems_file), name="ng", sets=TINY_SETS["ngram"])
    with pytest.raises(BadRequest, match=r"--horizon does not apply to text runs \(--horizon applies to series"):
        service.generate("ng", {"horizon": 3})
    with pytest.raises(BadRequest,
                       match=r"-n does not apply to text runs \(-n applies to image, music, video and sound runs\)"):
        service.evaluate("ng", {"n": 5})


def test_the_model_cache_loads_a_run_once_and_again_when_it_changes(poems_file, monkeypatch):
    run_dir, _ = service.train("ngram", str(poems_file), name="ng", sets=TINY_SETS["ngram"])
    service.MODELS.clear()
    loads = []
    text = MODALITIES["text"]
    real = text.load
    monkeypatch.setattr(text, "load", lambda spec: loads.append(spec) or real(spec))
    a = service.generate("ng", {"max_new_tokens": 5}, seed=1)
    b = service.generate(str(run_dir), {"max_new_tokens": 5}, seed=1)
    assert len(loads) == 1 and a.outputs == b.outputs
    service.train("ngram", str(poems_file), name="ng", overwrite=True, sets={**TINY_SETS["ngram"], "max_order": "2"})
    service.generate("ng", {"max_new_tokens": 5}, seed=1)
    assert len(loads) == 2  # the run was trained again: its manifest changed, so it is loaded again


def test_a_seed_is_drawn_when_none_is_given_and_reported(poems_file):
    service.train("ngram", str(poems_file), name="ng", sets=TINY_SETS["ngram"])
    first = service.generate("ng", {"max_new_tokens": 8})
    seed = first.record["settings"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**31
    assert service.generate("ng", {"max_new_tokens": 8}, seed=seed).outputs == first.outputs


def test_a_modality_loads_only_finished_runs_of_its_own(poems_file, tmp_path):
    """Every modality's `load` (aigc.modalities.base.finished_run): a run of another modality, and a run with no
    saved model yet, are one clear error each; a tampered weights file fails its manifest."""
    run_dir, _ = service.train("ngram", str(poems_file), name="ng", sets=TINY_SETS["ngram"])
    for name in ("image", "sound", "video", "series"):
        article = "an" if name == "image" else "a"
        with pytest.raises(BadRequest, match=rf"run 'ng' is not {article} {name} run"):
            MODALITIES[name].load("ng")
    unfinished = tmp_path / "runs" / "unfinished"
    unfinished.mkdir(parents=True)
    write_json(unfinished / "run.json", {**read_run(run_dir), "modality": "image", "status": "running"})
    with pytest.raises(Conflict, match=r"run 'unfinished' has no saved model yet \(status: running\)"):
        MODALITIES["image"].load(str(unfinished))
    write_json(unfinished / "manifest.json", {"files": {"model.safetensors": {"sha256": "0" * 64}}})
    (unfinished / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(UserError, match="model.safetensors"):
        MODALITIES["image"].load(str(unfinished))
