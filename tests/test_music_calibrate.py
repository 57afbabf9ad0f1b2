"""Calibrated sampling (issue 17): a music run's temperature fitted to its training pieces' pitch-class entropy and
scale consistency, then what it samples, evaluates and shows at unless asked otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from aigc import service
from aigc.cli import app
from aigc.errors import BadRequest, NotFound, UserError
from aigc.modalities import music
from conftest import TINY_SETS, make_poems

runner = CliRunner()


def test_the_nearest_temperature_is_the_closed_form_least_squares_point():
    """Per-piece values on exact lines: the chosen temperature is the minimum of the summed squared distances,
    sum_k ((a_k t + b_k - m_k) / s_k)^2, whose closed form is t* = sum a_k (m_k - b_k) / s_k^2 / sum a_k^2 / s_k^2,
    rounded to the 0.01 grid (within the temperatures sampled)."""
    rng = np.random.default_rng(0)
    temperatures = np.repeat(np.array(music.CALIBRATION_TEMPERATURES), 16)
    for _ in range(20):
        slopes, intercepts = rng.uniform(0.2, 1.0, 2) * rng.choice([-1, 1], 2), rng.uniform(2.0, 3.0, 2)
        spread = dict(zip(("a", "b"), rng.uniform(0.05, 0.3, 2), strict=True))
        values = {k: slopes[i] * temperatures + intercepts[i] for i, k in enumerate(("a", "b"))}
        means = {k: float(slopes[i] * rng.uniform(0.55, 0.85) + intercepts[i]) for i, k in enumerate(("a", "b"))}
        closed = sum(slopes[i] * (means[k] - intercepts[i]) / spread[k] ** 2 for i, k in enumerate(("a", "b"))) / \
            sum(slopes[i] ** 2 / spread[k] ** 2 for i, k in enumerate(("a", "b")))
        chosen, lines = music.nearest_temperature(temperatures, values, means, spread)
        assert chosen == pytest.approx(float(np.clip(closed, 0.5, 0.9)), abs=0.005 + 1e-9)
        assert lines["a"] == pytest.approx([slopes[0], intercepts[0]])


def test_the_fit_leaves_out_pieces_without_a_statistic_and_refuses_one_temperature():
    temperatures = np.array([0.5, 0.5, 0.9, 0.9, 0.9])
    entropy = np.array([2.5, 2.5, 2.9, 2.9, np.nan])  # a piece whose statistic is undefined
    chosen, _ = music.nearest_temperature(temperatures, {"e": entropy}, {"e": 2.7}, {"e": 0.1})
    assert chosen == 0.7  # on the line through (0.5, 2.5) and (0.9, 2.9)
    with pytest.raises(ValueError):
        music.nearest_temperature(temperatures, {"e": np.array([2.5, 2.5, np.nan, np.nan, np.nan])}, {"e": 2.7},
                                  {"e": 0.1})


def _tiny(midi_folder, name: str, **sampling):
    sets = {**TINY_SETS["gpt"], "val_fraction": "0.25", "n_positions": "256", **sampling}
    return service.train("gpt", str(midi_folder), name=name, sets=sets, max_steps=4)[0]


def test_a_calibrated_run_samples_evaluates_and_shows_its_own_temperature(aigc_home, midi_folder):
    run_dir = _tiny(midi_folder, "cal", calibrate="true", calibration_pieces="4")
    own = json.loads((run_dir / music.SAMPLING_FILE).read_text(encoding="utf-8"))
    assert 0.5 <= own["temperature"] <= 0.9 and own["top_p"] == music.SAMPLING_DEFAULTS["top_p"]
    assert own["temperature"] != music.SAMPLING_DEFAULTS["temperature"], "the default's own: nothing to tell apart"
    calibration = own["calibration"]
    assert calibration["pieces_per_temperature"] == 4 and calibration["seed"] == music.CALIBRATION_SEED
    assert set(calibration["sampled"]) == set(music.CALIBRATED)
    # the training pieces' statistics it was fitted to, as evaluation measures them (the floor)
    result = service.evaluate("cal", {"n": 2})
    for key in music.CALIBRATED:
        assert calibration["training"][key] == pytest.approx(result["statistics"]["train"][key]["mean"])
    assert result["samples"]["temperature"] == own["temperature"]  # evaluated as it samples
    made = service.generate("cal", {"n": 1}, seed=0)
    assert made.record["settings"]["temperature"] == own["temperature"]
    assert made.record["settings"]["top_p"] == own["top_p"]
    asked = service.generate("cal", {"n": 1, "temperature": 1.0}, seed=0)  # a temperature asked for wins
    assert asked.record["settings"]["temperature"] == 1.0
    assert service.generation_defaults("cal")["temperature"] == own["temperature"]  # what the studio shows
    assert f"samples at temperature {own['temperature']}" in (run_dir / "README.md").read_text(encoding="utf-8")
    # calibrating again reads the same pieces at the same seed: the same temperature, by the CLI too
    done = runner.invoke(app, ["calibrate", "cal", "--pieces", "4", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["temperature"] == own["temperature"]


def test_a_short_run_is_not_calibrated_by_default_and_samples_at_the_music_defaults(aigc_home, midi_folder):
    run_dir = _tiny(midi_folder, "short")  # calibrate = auto: 4 steps are far below CALIBRATE_AFTER_MINUTES
    assert not (run_dir / music.SAMPLING_FILE).exists()
    assert service.generate("short", {"n": 1}, seed=0).record["settings"]["temperature"] == \
        music.SAMPLING_DEFAULTS["temperature"]
    assert "not calibrated" in (run_dir / "README.md").read_text(encoding="utf-8")


def test_calibrating_what_cannot_be_calibrated_is_one_clear_error(aigc_home, midi_folder, tmp_path):
    poems = tmp_path / "poems.txt"
    poems.write_text("\n%\n".join(make_poems(20)) + "\n", encoding="utf-8")
    service.train("ngram", str(poems), name="words", sets=TINY_SETS["ngram"])
    with pytest.raises(BadRequest, match="calibrate applies to music runs"):
        service.calibrate("words")
    with pytest.raises(NotFound):
        service.calibrate("nothing-here")
    service.train("ngram", str(midi_folder), name="counted", sets=TINY_SETS["ngram"])
    with pytest.raises(BadRequest, match="--pieces must be in 4..1024"):
        service.calibrate("counted", 2)
    assert not (tmp_path / "aigc_home" / "runs" / "counted" / music.SAMPLING_FILE).exists()
    done = runner.invoke(app, ["calibrate", "words"])
    assert done.exit_code != 0 and "calibrate applies to music runs" in done.output
    with pytest.raises(UserError, match="calibrate: must be one of auto, true, false"):  # a value it does not know
        service.train("gpt", str(midi_folder), name="never", sets={**TINY_SETS["gpt"], "calibrate": "sometimes"},
                      max_steps=1)


def test_a_stopped_calibration_leaves_the_trained_run_whole(aigc_home, midi_folder, monkeypatch, capsys):
    """Ctrl-C (or the studio's Stop) while the sampling is being fitted: the weights were saved, so the run is done
    and samples at the music defaults (fault injected where the calibration samples)."""
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(music, "generate", stopped)
    run_dir = _tiny(midi_folder, "stopped", calibrate="true", calibration_pieces="4")
    assert json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["status"] == "done"
    assert not (run_dir / music.SAMPLING_FILE).exists()
    assert "the sampling was not calibrated (it was stopped)" in capsys.readouterr().err


def test_the_train_help_lists_the_music_keys_of_a_text_family():
    shown = runner.invoke(app, ["train", "--family", "gpt", "--help"], terminal_width=200).output
    music_part = shown[shown.index("Configuration keys of gpt on music"):]
    assert "calibrate = 'auto' (auto|true|false)" in music_part and "calibration_pieces = 64" in music_part
    assert "transpose = 0" in music_part and "tokenizer" not in music_part  # the music [data], not the text one


def test_sweep_trials_on_music_are_not_calibrated_unless_the_space_says(aigc_home, midi_folder):
    from aigc.sweep import plan_sweep

    plan = plan_sweep(family="gpt", data=str(midi_folder), trials=2, budget_minutes=3)
    assert plan.fixed["calibrate"] == "false"  # ranked by held-out NLL: `aigc calibrate` the one kept
    asked = plan_sweep(family="gpt", data=str(midi_folder), trials=2, budget_minutes=3, space={"calibrate": "true",
                                                                                     "lr": {"low": 1e-4, "high": 1e-3}})
    assert asked.fixed["calibrate"] == "true"


def test_a_damaged_sampling_file_is_one_clear_error(aigc_home, midi_folder):
    run_dir = _tiny(midi_folder, "damaged")
    (run_dir / music.SAMPLING_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="is not valid JSON: fit it again with `aigc calibrate damaged`"):
        service.generate("damaged", {"n": 1}, seed=0)
