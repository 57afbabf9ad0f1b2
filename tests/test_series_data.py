"""Series data: statsmodels' named series, CSV files, missing values (never a silent fill), checks."""

from __future__ import annotations

import numpy as np
import pytest

from aigc.data.series import NAMED_SERIES, SeriesDataConfig, future_time, is_series_data, load_series
from aigc.errors import UserError


def cfg(**kw) -> SeriesDataConfig:
    return SeriesDataConfig(**kw)


def test_named_series_load_with_dates_frequency_and_season():
    for name, named in NAMED_SERIES.items():
        if name == "co2":
            continue  # has gaps: below
        s = load_series(name)
        assert len(s.values) == len(s.time) >= 100 and np.isfinite(s.values).all()
        assert s.column == named.column and s.season == named.season and s.missing == 0
    sunspots = load_series("sunspots")
    assert (sunspots.time[0], sunspots.time[-1], len(sunspots.values)) == ("1700-01-01", "2008-01-01", 309)
    assert load_series("macrodata").time[:2] == ["1959-01-01", "1959-04-01"]
    assert load_series("macrodata", cfg(column="cpi")).column == "cpi"
    assert len(load_series("elnino").values) == 61 * 12


def test_co2_gaps_are_an_error_unless_a_fill_is_chosen():
    with pytest.raises(UserError, match="59 missing values .* --fill interpolate or --fill drop"):
        load_series("co2")
    filled = load_series("co2", cfg(fill="interpolate"))
    dropped = load_series("co2", cfg(fill="drop"))
    assert (filled.missing, filled.dropped, len(filled.values)) == (59, 0, 2284)
    assert (dropped.missing, dropped.dropped, len(dropped.values)) == (59, 59, 2225)
    assert filled.freq == "W-SAT" and filled.season == 52
    assert filled.sha256 != dropped.sha256


def write(tmp_path, text: str, name: str = "s.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_without_dates_uses_its_only_numeric_column(tmp_path):
    rows = "\n".join(f"r{i},{i % 7 + 0.5 * i}" for i in range(20))
    s = load_series(write(tmp_path, "label,value\n" + rows + "\n"))
    assert s.column == "value" and s.freq is None and s.time[:3] == [0, 1, 2] and s.season == 0
    assert future_time(s.time[-1], s.freq, 3) == [20, 21, 22]


def test_csv_with_dates_infers_the_frequency_and_season(tmp_path):
    dates = [f"2020-{m:02d}-01" for m in range(1, 13)] + [f"2021-{m:02d}-01" for m in range(1, 13)]
    text = "month,sales,cost\n" + "\n".join(f"{d},{i * 1.5 + (i % 3)},{i}" for i, d in enumerate(dates)) + "\n"
    path = write(tmp_path, text)
    with pytest.raises(UserError, match="several numeric columns .* --column"):
        load_series(path, cfg(time_column="month"))
    s = load_series(path, cfg(column="sales", time_column="month"))
    assert s.freq == "MS" and s.season == 12 and s.time[0] == "2020-01-01"
    assert future_time(s.time[-1], s.freq, 2) == ["2022-01-01", "2022-02-01"]
    assert load_series(path, cfg(column="sales", time_column="month", season=3)).season == 3


def test_absent_dates_are_missing_values(tmp_path):
    days = [f"2024-01-{d:02d}" for d in range(1, 31) if d not in (5, 6)]
    path = write(tmp_path, "day,x\n" + "\n".join(f"{d},{i % 5 + i}" for i, d in enumerate(days)) + "\n")
    with pytest.raises(UserError, match="cannot infer a regular frequency .* --freq"):
        load_series(path, cfg(time_column="day"))
    with pytest.raises(UserError, match="2 missing values .*the first at 2024-01-05"):
        load_series(path, cfg(time_column="day", freq="D"))
    s = load_series(path, cfg(time_column="day", freq="D", fill="interpolate"))
    assert len(s.values) == 30 and s.missing == 2 and s.season == 7
    i = s.time.index("2024-01-05")
    assert s.values[i] == pytest.approx(s.values[i - 1] + (s.values[i + 2] - s.values[i - 1]) / 3)


def test_interpolate_drops_missing_values_at_the_ends(tmp_path):
    values = ["", *[str(i % 4 + i) for i in range(15)], ""]
    path = write(tmp_path, "x\n" + "\n".join(values) + "\n")
    s = load_series(path, cfg(fill="interpolate"))
    assert (s.missing, s.dropped, len(s.values), s.time[0]) == (2, 2, 15, 1)


@pytest.mark.parametrize("text, kw, words", [
    ("x\n1\n2\nthree\n4\n", {}, "not numeric: row 3 holds 'three'"),
    ("x\n" + "5\n" * 20, {}, "constant (every value is 5)"),
    ("x\n1\n2\n3\n", {}, "3 values; a series needs at least 10"),
    ("x\n" + "\n".join(map(str, range(20))) + "\n", {"column": "y"}, "has no column 'y' (columns: x)"),
    ("x\n" + "\n".join(map(str, range(20))) + "\n", {"freq": "D"}, "--freq needs --time-column"),
    ("t,x\n" + "\n".join(f"2024-01-{d:02d},{d}" for d in range(1, 20)) + "\n", {"time_column": "t", "freq": "xyz"},
     "not a pandas frequency"),
    ("t,x\n" + "\n".join(f"2024-01-{d:02d},{d}" for d in range(19, 0, -1)) + "\n", {"time_column": "t"},
     "strictly increasing"),
    ("t,x\n" + "\n".join(f"day {d},{d}" for d in range(1, 20)) + "\n", {"time_column": "t"}, "not dates"),
    ("x\n1\ninf\n" + "\n".join(map(str, range(20))) + "\n", {}, "infinite"),
])
def test_bad_csv_input_is_a_clear_error(tmp_path, text, kw, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_series(write(tmp_path, text), cfg(**kw))


def test_named_series_take_no_dates_and_unknown_data_is_an_error(tmp_path):
    with pytest.raises(UserError, match="named series with its own dates"):
        load_series("sunspots", cfg(freq="D"))
    with pytest.raises(UserError, match="is not series data"):
        load_series("poems.txt")
    with pytest.raises(UserError, match="no such file"):
        load_series(str(tmp_path / "missing.csv"))
    assert is_series_data("co2") and is_series_data("x.CSV") and not is_series_data("poems.txt")
