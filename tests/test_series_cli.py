"""Series through the CLI: `train --family ar|rnn` on a named series or a CSV file, `generate
--horizon/--paths/--level/--noise`, `eval` back-tests, and the user errors of the issue, each one
line on stderr with nothing half-made left behind."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aigc.models.ar import AR
from test_cli import assert_ok, assert_user_error, invoke, one_json, run_names
from test_series_ar import simulate

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = {"mae", "rmse", "mase", "mase_seasonal", "coverage", "ljung_box_p"}
TINY_RNN = ["--set", "n_hidden=8", "--set", "block_size=8", "--set", "batch_size=8", "--set", "warmup_steps=2",
            "--set", "eval_interval=10", "--set", "eval_batches=2", "--set", "log_interval=5", "--set", "dtype=fp32"]


def monthly_csv(path: Path, n: int = 120, seed: int = 0, gap: bool = False) -> Path:
    """A simulated AR(2) with monthly dates and a second numeric column."""
    x = simulate(n, seed=seed)
    dates = [f"{2000 + i // 12}-{i % 12 + 1:02d}-01" for i in range(n)]
    rows = [f"{d},{float(v)!r},{i}" for i, (d, v) in enumerate(zip(dates, x, strict=True)) if not (gap and i == 50)]
    path.write_text("month,sales,index\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An AR run on sunspots and a tiny rnn run on a CSV file, made once for this module."""
    root = tmp_path_factory.mktemp("series")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(root / "home"))
        result = invoke("train", "--family", "ar", "--data", "sunspots", "--name", "ar-run", "--json")
        assert_ok(result)
        out["ar"] = (one_json(result), root / "home" / "runs" / "ar-run")
        data = monthly_csv(root / "sales.csv", n=200)
        result = invoke("train", "--family", "rnn", "--data", data, "--column", "sales", "--time-column", "month",
                        "--name", "rnn-run", "--max-steps", 20, *TINY_RNN, "--json")
        assert_ok(result)
        out["rnn"] = (one_json(result), root / "home" / "runs" / "rnn-run")
    return out


def test_train_ar_reports_order_and_lags(runs):
    obj, run_dir = runs["ar"]
    m = obj["metrics"]
    assert isinstance(m["order"], int) and m["order"] >= 1
    assert m["lags"] == list(range(1, m["order"] + 1))
    assert (obj["order"], obj["lags"]) == (m["order"], m["lags"])  # also at the top level
    assert m["max_order"] == 24 and m["sigma"] > 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["modality"] == "series" and record["status"] == "done"
    assert record["data"]["train"]["values"] == 309 and record["data"]["train"]["fill"] == "none"
    for name in ("series.json", "ar.json", "ar.safetensors", "manifest.json", "config.toml", "README.md"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.pt")) and not list(run_dir.glob("*.pkl"))  # no pickles


def test_generate_forecast_intervals_and_paths(runs, tmp_path):
    _, run_dir = runs["ar"]
    result = invoke("generate", run_dir, "--horizon", 5, "--paths", 3, "--level", 0.9, "--seed", 0,
                    "--out", tmp_path, "--json")
    assert_ok(result)
    obj = one_json(result)
    assert obj["time"] == [f"{y}-01-01" for y in range(2009, 2014)]
    model = AR.load(run_dir)
    assert obj["forecast"] == model.forecast(5).tolist()
    assert [obj["lower"], obj["upper"]] == [a.tolist() for a in model.interval(5, 0.9)]
    assert np.asarray(obj["paths"]).shape == (3, 5)
    again = one_json(invoke("generate", run_dir, "--horizon", 5, "--paths", 3, "--level", 0.9, "--seed", 0,
                            "--out", tmp_path / "again", "--json"))
    assert again["paths"] == obj["paths"]
    rows = list(csv.reader((tmp_path / "forecast.csv").open()))
    assert rows[0] == ["time", "forecast", "lower", "upper", "path_1", "path_2", "path_3"] and len(rows) == 6
    assert float(rows[1][1]) == obj["forecast"][0]
    assert (tmp_path / "fan_chart.png").read_bytes()[:4] == b"\x89PNG"
    plain = one_json(invoke("generate", run_dir, "--horizon", 2, "--noise", "bootstrap", "--out", tmp_path, "--json"))
    assert "paths" not in plain and plain["level"] == 0.95


def test_generate_table_without_json(runs, tmp_path):
    _, run_dir = runs["ar"]
    result = invoke("generate", run_dir, "--horizon", 3, "--out", tmp_path)
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["time", "forecast", "lower", "upper"] and len(lines) == 4
    assert "seed" in result.stderr and "fan_chart.png" in result.stderr


def test_eval_ar_back_tests(runs):
    _, run_dir = runs["ar"]
    result = invoke("eval", run_dir, "--horizon", 3, "--json")
    assert_ok(result)
    obj = one_json(result)
    assert set(obj["metrics"]) == METRICS and obj["run"] == str(run_dir)
    m = obj["metrics"]
    assert m["mase_seasonal"] is None  # sunspots has no fixed season
    assert 0 < m["mase"] < obj["naive"]["mase"]  # AR beats the naive forecast on the same origins
    assert 0.5 < m["coverage"] <= 1 and 0 <= m["ljung_box_p"] <= 1
    assert obj["backtest"]["origins"] == 31 and obj["backtest"]["forecasts"] == 31 * 3 - 3
    assert json.loads((run_dir / "eval.json").read_text()) == obj
    assert (run_dir / "backtest.png").is_file()


def test_rnn_on_a_csv_generates_and_evaluates(runs):
    obj, run_dir = runs["rnn"]
    assert obj["metrics"]["steps"] == 20 and obj["metrics"]["val_loss"] > 0
    result = invoke("generate", run_dir, "--horizon", 4, "--paths", 2, "--seed", 1, "--json")
    assert_ok(result)
    gen = one_json(result)
    assert gen["time"] == ["2016-09-01", "2016-10-01", "2016-11-01", "2016-12-01"]
    assert np.asarray(gen["paths"]).shape == (2, 4)
    result = invoke("eval", run_dir, "--horizon", 2, "--json")
    assert_ok(result)
    ev = one_json(result)
    assert set(ev["metrics"]) == METRICS and ev["metrics"]["mase_seasonal"] is not None  # monthly: season 12
    assert "once" in ev["backtest"]["refit"]


def test_csv_ar_with_a_given_order(tmp_path):
    data = monthly_csv(tmp_path / "s.csv")
    result = invoke("train", "--family", "ar", "--data", data, "--column", "sales", "--time-column", "month",
                    "--order", 2, "--name", "two", "--json")
    assert_ok(result)
    assert one_json(result)["metrics"]["order"] == 2 and one_json(result)["metrics"]["lags"] == [1, 2]
    gen = one_json(invoke("generate", "two", "--horizon", 2, "--json"))
    assert gen["time"] == ["2010-01-01", "2010-02-01"]
    gap = monthly_csv(tmp_path / "gap.csv", gap=True)
    assert_user_error(invoke("train", "--family", "ar", "--data", gap, "--column", "sales", "--time-column",
                             "month", "--name", "gap"), "cannot infer a regular frequency", "--freq")
    assert_user_error(invoke("train", "--family", "ar", "--data", gap, "--column", "sales", "--time-column",
                             "month", "--freq", "MS", "--name", "gap"), "1 missing value", "2004-03-01", "--fill")
    result = invoke("train", "--family", "ar", "--data", gap, "--column", "sales", "--time-column", "month",
                    "--freq", "MS", "--fill", "interpolate", "--name", "gap", "--json")
    assert_ok(result)
    record = json.loads((Path(one_json(result)["run_dir"]) / "run.json").read_text())
    assert record["data"]["train"]["fill"] == "interpolate" and record["data"]["train"]["missing"] == 1


@pytest.mark.parametrize("args, words", [
    (["--horizon", 0], ["--horizon must be in 1..1000, got 0"]),
    (["--horizon", 1001], ["--horizon must be in 1..1000"]),
    ([], ["series runs need --horizon H"]),
    (["--horizon", 3, "--paths", 5000], ["--paths must be in 0..1000"]),
    (["--horizon", 3, "--level", 1.5], ["--level must be in (0, 1)"]),
    (["--horizon", 3, "--noise", "laplace"], ["--noise must be one of gaussian, bootstrap"]),
    (["--horizon", 3, "-n", 3], ["-n (use --paths K) does not apply to series runs"]),
    (["--horizon", 3, "--temperature", 0.5], ["--temperature does not apply to series runs"]),
])
def test_generate_errors(runs, args, words):
    _, run_dir = runs["ar"]
    assert_user_error(invoke("generate", run_dir, *args), *words)


def write_csv(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_train_errors_leave_nothing_behind(tmp_path, aigc_home):
    short = write_csv(tmp_path, "short.csv", "x\n" + "\n".join(str(v) for v in simulate(20)) + "\n")
    words = write_csv(tmp_path, "words.csv", "x\n1\n2\nmany\n" + "3\n" * 20)
    flat = write_csv(tmp_path, "flat.csv", "x\n" + "7.5\n" * 30)
    poems = write_csv(tmp_path, "poems.txt", "春眠不觉晓\n")
    cases = [
        (["--family", "ar", "--data", "co2"], ["59 missing values", "--fill interpolate or --fill drop"]),
        (["--family", "ar", "--data", words], ["not numeric: row 3 holds 'many'"]),
        (["--family", "ar", "--data", flat], ["constant (every value is 7.5)"]),
        (["--family", "ar", "--data", short, "--order", 8], ["order 8 needs at least 26"]),
        (["--family", "ar", "--data", short], ["max_order 24 needs at least 58", "--max-order"]),
        (["--family", "ar", "--data", "sunspots", "--order", "two"], ["--order must be a positive integer or auto"]),
        (["--family", "ar", "--data", "sunspots", "--order", 0], ["--order must be >= 1"]),
        (["--family", "ar", "--data", "sunspots", "--order", 3, "--max-order", 5], ["--max-order applies to "
                                                                                   "--order auto"]),
        (["--family", "ar", "--data", "sunspots", "--max-steps", 5], ["--max-steps", "closed form"]),
        (["--family", "ar", "--data", "sunspots", "--set", "cell=gru"], ["unknown key 'cell'"]),
        (["--family", "gpt", "--data", "sunspots"], ["family gpt does not take a numeric series", "ar"]),
        (["--family", "gpt", "--data", "sunspots", "--order", 3], ["--order applies to the ar family"]),
        (["--family", "rnn", "--data", poems, "--column", "x"], ["--column applies to series data"]),
        (["--family", "ar", "--data", poems], ["fits a numeric series"]),
        (["--family", "ar", "--data", "sunspots", "--freq", "D"], ["named series with its own dates"]),
        (["--family", "rnn", "--data", "sunspots", "--set", "block_size=300"], ["block_size 300 needs at least 302"]),
    ]
    for args, expected in cases:
        assert_user_error(invoke("train", *args, "--name", "bad"), *expected)
        assert run_names(aigc_home) == []


def test_series_flags_on_other_runs_are_errors(tmp_path, aigc_home, runs, poems_file):
    assert_ok(invoke("train", "--family", "ngram", "--data", poems_file, "--name", "ng", "--set", "max_order=3"))
    assert_user_error(invoke("generate", "ng", "--horizon", 3), "--horizon applies to series runs")
    assert_user_error(invoke("eval", "ng", "--level", 0.9), "--level applies to series runs")
    _, run_dir = runs["ar"]
    assert_user_error(invoke("eval", run_dir, "-n", 5), "-n does not apply to series runs")
    assert_user_error(invoke("eval", run_dir, "--horizon", 0), "--horizon must be in 1..1000")


def test_a_changed_series_file_is_refused(runs, aigc_home):
    dest = aigc_home / "runs" / "copy"
    shutil.copytree(runs["ar"][1], dest)
    path = dest / "series.json"
    record = json.loads(path.read_text())
    record["values"][0] += 1
    path.write_text(json.dumps(record))
    assert_user_error(invoke("generate", "copy", "--horizon", 2), "series.json does not match the sha256")


def test_data_list_and_show_name_the_series():
    result = invoke("data", "list")
    assert_ok(result)
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    for name in ("sunspots", "co2", "macrodata", "nile", "elnino"):
        assert name in rows
    assert rows["co2"][1:3] == ["2284", "59"]
    shown = one_json(invoke("data", "show", "co2", "--json"))
    assert shown["values"] == 2284 and shown["missing"] == 59 and shown["freq"] == "W-SAT"


def test_rnn_series_run_resumes(tmp_path, aigc_home):
    data = monthly_csv(tmp_path / "s.csv", n=150)
    base = ["train", "--family", "rnn", "--data", data, "--name", "r", "--json"]
    assert_ok(invoke(*base, "--column", "sales", "--time-column", "month", "--max-steps", 10, *TINY_RNN))
    result = invoke(*base, "--resume", "--max-steps", 20)
    assert_ok(result)
    assert one_json(result)["metrics"]["steps"] == 20
    assert_user_error(invoke(*base, "--resume", "--max-steps", 30, "--fill", "drop"), "--resume continues")
    assert_user_error(invoke("train", "--family", "rnn", "--data", "nile", "--name", "r", "--resume"),
                      "was trained on")
