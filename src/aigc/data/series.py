"""Numeric series: the named series statsmodels ships, CSV files, missing values and the checks.

A series is x_0 .. x_{n-1}, float64, observed at regular steps: dated (a pandas frequency such as
`YS`, `QS`, `MS`, `W-SAT`) or plain consecutive rows. What a model sees is always finite and
complete; a missing value is an error unless the user chose how to handle it (`--fill`):

- `interpolate`: interior gaps are filled linearly between their neighbours; missing values at
  either end have no neighbour on one side and are dropped (both counts are recorded);
- `drop`: missing values are removed, and their neighbours become consecutive.

Named series come from `statsmodels.datasets` (bundled with the pip package: offline), each with
its default column, frequency and season (the period of the seasonal naive forecast).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from aigc.config import option
from aigc.errors import UserError

FILLS = ("none", "interpolate", "drop")
MIN_VALUES = 10  # a series shorter than this is an error whatever the model
MAX_VALUES = 10_000_000  # dated rows spread over a grid of more steps than this are an error
# the season implied by a frequency (pandas offset name without its anchor; multiplier 1 only)
SEASONS = {"MS": 12, "ME": 12, "QS": 4, "QE": 4, "W": 52, "D": 7, "B": 5, "h": 24}


@dataclass
class SeriesDataConfig:
    column: str = option("", "the column of values (--column); empty: the named series' own, or a CSV "
                             "file's only numeric column")
    time_column: str = option("", "CSV: the column of dates (--time-column); empty: rows are consecutive steps")
    freq: str = option("", "CSV: pandas frequency of the dates, e.g. D, W-SUN, MS, QS, YS (--freq); "
                           "empty: inferred from the dates")
    fill: str = option("none", "missing values: none = an error; interpolate = linear inside, dropped at "
                               "the ends; drop = removed (--fill)", choices=FILLS)
    season: int = option(0, "period of the seasonal naive forecast in eval; 0 = from the frequency "
                            "(12 monthly, 4 quarterly, 52 weekly, 7 daily, 24 hourly; none for yearly)",
                         min=0, max=100_000)


@dataclass(frozen=True)
class Series:
    source: str  # a named series, or the resolved path of a CSV file
    column: str  # the column the values come from
    values: np.ndarray  # (n,) float64, finite
    time: list  # label of each value: ISO dates ("1958-03-29") or row positions (int)
    freq: str | None  # pandas frequency of dated series; None for row positions
    season: int  # period of the seasonal naive forecast; 0 = none
    fill: str  # "none", "interpolate" or "drop"
    missing: int  # missing values in the raw data (interpolated or dropped)
    dropped: int  # values removed: missing ones with fill=drop, or at the ends with interpolate

    @property
    def sha256(self) -> str:
        """Of the values and their time labels, as the model sees them."""
        h = hashlib.sha256(np.ascontiguousarray(self.values, dtype="<f8").tobytes())
        h.update("\n".join(map(str, self.time)).encode("utf-8"))
        return h.hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "column": self.column, "values": len(self.values), "start": self.time[0],
                "end": self.time[-1], "freq": self.freq, "season": self.season, "fill": self.fill,
                "missing": self.missing, "dropped": self.dropped, "sha256": self.sha256}


# ----------------------------------------------------------------------------------
# named series (statsmodels.datasets), each a DataFrame with a DatetimeIndex


def _sunspots() -> pd.DataFrame:
    from statsmodels.datasets import sunspots

    df = sunspots.load_pandas().data
    return df.drop(columns="YEAR").set_index(_years(df["YEAR"]))


def _co2() -> pd.DataFrame:
    from statsmodels.datasets import co2

    return co2.load_pandas().data  # already indexed by week (Saturdays)


def _macrodata() -> pd.DataFrame:
    from statsmodels.datasets import macrodata

    df = macrodata.load_pandas().data
    quarters = pd.PeriodIndex.from_fields(year=df["year"].astype(int), quarter=df["quarter"].astype(int), freq="Q")
    return df.drop(columns=["year", "quarter"]).set_index(quarters.to_timestamp(how="start"))


def _nile() -> pd.DataFrame:
    from statsmodels.datasets import nile

    df = nile.load_pandas().data
    return df.drop(columns="year").set_index(_years(df["year"]))


def _elnino() -> pd.DataFrame:
    from statsmodels.datasets import elnino

    wide = elnino.load_pandas().data  # one row per year, one column per month
    months = wide.drop(columns="YEAR").to_numpy().ravel()
    index = pd.date_range(f"{int(wide['YEAR'].iloc[0])}-01-01", periods=len(months), freq="MS")
    return pd.DataFrame({"temperature": months}, index=index)


def _years(column: pd.Series) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(pd.to_datetime(column.astype(int).astype(str), format="%Y"))


@dataclass(frozen=True)
class NamedSeries:
    frame: Callable[[], pd.DataFrame]  # the data set, indexed by date
    column: str  # default column
    freq: str  # pandas frequency of the index
    season: int  # period of the seasonal naive forecast; 0 = none
    description: str


NAMED_SERIES: dict[str, NamedSeries] = {
    "sunspots": NamedSeries(_sunspots, "SUNACTIVITY", "YS", 0, "yearly sunspot numbers, 1700-2008"),
    "co2": NamedSeries(_co2, "co2", "W-SAT", 52, "weekly CO2 at Mauna Loa (ppm), 1958-2001, 59 missing"),
    "macrodata": NamedSeries(_macrodata, "realgdp", "QS", 4, "quarterly US macro data 1959Q1-2009Q3 "
                                                            "(realgdp, cpi, unemp, ...)"),
    "nile": NamedSeries(_nile, "volume", "YS", 0, "yearly flow of the Nile at Aswan, 1871-1970"),
    "elnino": NamedSeries(_elnino, "temperature", "MS", 12, "monthly Pacific sea surface temperature, 1950-2010"),
}


def is_series_data(spec: str) -> bool:
    """A named series or a .csv file: the data that makes a run a series run."""
    return spec in NAMED_SERIES or Path(spec).suffix.lower() == ".csv"


# ----------------------------------------------------------------------------------
# loading


def load_series(spec: str, cfg: SeriesDataConfig | None = None) -> Series:
    """A named series or a CSV file, with its missing values handled as `cfg.fill` says, checked."""
    cfg = cfg or SeriesDataConfig()
    if spec in NAMED_SERIES:
        named = NAMED_SERIES[spec]
        if cfg.time_column or cfg.freq:
            raise UserError(f"{spec} is a named series with its own dates and frequency ({named.freq}): "
                            f"--time-column and --freq apply to CSV files")
        frame = named.frame()
        column = cfg.column or named.column
        raw = _numeric_column(frame, column, spec)
        raw.index = frame.index
        raw, freq = _on_grid(raw, named.freq, spec, "the index")
        source, season = spec, cfg.season or named.season
    elif Path(spec).suffix.lower() == ".csv":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"no such file: {spec}")
        source = str(path.resolve())
        frame = _read_csv(path)
        column = cfg.column or _only_numeric_column(frame, cfg.time_column, spec)
        raw = _numeric_column(frame, column, spec)
        freq = None
        if cfg.time_column:
            raw.index = _dates(frame, cfg.time_column, spec)
            raw, freq = _on_grid(raw, cfg.freq or None, spec, f"column {cfg.time_column!r}")
        elif cfg.freq:
            raise UserError("--freq needs --time-column: without dates the rows are consecutive steps")
        season = cfg.season or _season_of(freq)
    else:
        raise UserError(f"{spec!r} is not series data: give a named series ({', '.join(NAMED_SERIES)}) or a "
                        f".csv file")
    if np.isinf(raw.to_numpy(dtype=float, na_value=np.nan)).any():
        raise UserError(f"{spec}: column {column!r} holds infinite values")
    values, time, missing, dropped = _fill(raw, cfg.fill, spec, column)
    check_values(values, f"{spec} (column {column!r})")
    return Series(source, column, values, time, freq, season, cfg.fill, missing, dropped)


def check_values(values: np.ndarray, what: str) -> None:
    """Enough values, all finite, not all equal."""
    if len(values) < MIN_VALUES:
        raise UserError(f"{what}: {len(values)} values; a series needs at least {MIN_VALUES}")
    if not np.isfinite(values).all():
        raise UserError(f"{what}: holds missing or infinite values")
    if np.ptp(values) == 0:
        raise UserError(f"{what}: the series is constant (every value is {values[0]:g}): there is nothing to model")


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        # blank lines are rows of missing values, not skipped: nothing disappears silently
        frame = pd.read_csv(path, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV file: {str(e).splitlines()[0]}") from None
    if frame.empty:
        raise UserError(f"{path}: no rows")
    return frame


def _only_numeric_column(frame: pd.DataFrame, time_column: str, spec: str) -> str:
    """The only column besides the dates, or else the only numeric one."""
    others = [c for c in frame.columns if c != time_column]
    candidates = others if len(others) == 1 else [
        c for c in others if frame[c].notna().any()
        and pd.to_numeric(frame[c], errors="coerce").notna().sum() == frame[c].notna().sum()]
    if len(candidates) == 1:
        return str(candidates[0])
    raise UserError(f"{spec} has {'no numeric column' if not candidates else 'several numeric columns'} "
                    f"(columns: {', '.join(map(str, frame.columns))}): choose one with --column")


def _numeric_column(frame: pd.DataFrame, column: str, spec: str) -> pd.Series:
    if column not in frame.columns:
        raise UserError(f"{spec} has no column {column!r} (columns: {', '.join(map(str, frame.columns))})")
    original = frame[column].reset_index(drop=True)
    numbers = pd.to_numeric(original, errors="coerce")
    bad = numbers.isna() & original.notna() & (original.astype(str).str.strip() != "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"column {column!r} of {spec} is not numeric: row {row + 1} holds {original.iloc[row]!r}")
    return numbers.astype(float)


def _dates(frame: pd.DataFrame, time_column: str, spec: str) -> pd.DatetimeIndex:
    if time_column not in frame.columns:
        raise UserError(f"{spec} has no column {time_column!r} (columns: {', '.join(map(str, frame.columns))})")
    try:
        with warnings.catch_warnings():  # "could not infer format": the values are parsed one by one
            warnings.simplefilter("ignore", UserWarning)
            dates = pd.DatetimeIndex(pd.to_datetime(frame[time_column], errors="raise"))
    except (ValueError, TypeError) as e:
        raise UserError(f"column {time_column!r} of {spec} holds values that are not dates: "
                        f"{str(e).splitlines()[0]}") from None
    if dates.isna().any():
        raise UserError(f"column {time_column!r} of {spec}: row {int(np.flatnonzero(dates.isna())[0]) + 1} has no date")
    if not dates.is_monotonic_increasing or dates.has_duplicates:
        raise UserError(f"column {time_column!r} of {spec}: the dates must be strictly increasing")
    return dates


def _on_grid(raw: pd.Series, freq: str | None, spec: str, where: str) -> tuple[pd.Series, str]:
    """Place dated values on the regular grid of `freq` (inferred when None); dates absent from the
    data become missing values."""
    from pandas.tseries.frequencies import to_offset

    dates = raw.index
    if freq is None:
        inferred = pd.DatetimeIndex(dates, freq="infer").freq if len(dates) >= 3 else None
        freq = None if inferred is None else inferred.freqstr
        if freq is None:
            raise UserError(f"{spec}: cannot infer a regular frequency from the dates in {where}; give --freq "
                            f"(e.g. D, W-SUN, MS, QS, YS)")
    try:
        offset = to_offset(freq)
    except ValueError:
        raise UserError(f"--freq {freq!r} is not a pandas frequency (e.g. D, W-SUN, MS, QS, YS)") from None
    try:
        steps = len(pd.date_range(dates[0], dates[-1], freq=offset))
    except (ValueError, OverflowError):
        steps = MAX_VALUES + 1
    if steps > MAX_VALUES:
        raise UserError(f"{spec}: at frequency {freq} the dates span more than {MAX_VALUES:,} steps")
    grid = pd.date_range(dates[0], dates[-1], freq=offset)
    off_grid = dates[~dates.isin(grid)]
    if len(off_grid):
        raise UserError(f"{spec}: the date {off_grid[0].isoformat()} in {where} is not on the grid of frequency "
                        f"{freq} starting at {dates[0].isoformat()}")
    return raw.reindex(grid), offset.freqstr


def _season_of(freq: str | None) -> int:
    if freq is None:
        return 0
    from pandas.tseries.frequencies import to_offset

    offset = to_offset(freq)
    return SEASONS.get(offset.rule_code.split("-")[0], 0) if offset.n == 1 else 0


def _fill(raw: pd.Series, fill: str, spec: str, column: str) -> tuple[np.ndarray, list, int, int]:
    """(values, time labels, missing, dropped) after handling missing values as `fill` says."""
    if fill not in FILLS:
        raise UserError(f"--fill must be one of {', '.join(FILLS)}, got {fill!r}")
    dated = isinstance(raw.index, pd.DatetimeIndex)
    labels = _labels(raw.index) if dated else list(range(len(raw)))
    missing = raw.isna().to_numpy()
    n_missing = int(missing.sum())
    if n_missing and fill == "none":
        first = labels[int(np.flatnonzero(missing)[0])]
        where = f"at {first}" if dated else f"in row {first + 1}"
        raise UserError(f"{spec}: {n_missing} missing value{'s' if n_missing > 1 else ''} in column {column!r} "
                        f"(the first {where}): pass --fill interpolate or --fill drop")
    values = raw.to_numpy(dtype=float, na_value=np.nan)
    if fill == "interpolate" and n_missing:
        # linear in the step index: the grid is regular, so this is linear in time
        values = pd.Series(values).interpolate(method="linear", limit_area="inside").to_numpy()
    keep = ~np.isnan(values)
    return values[keep], [t for t, k in zip(labels, keep, strict=True) if k], n_missing, int((~keep).sum())


def _labels(index: pd.DatetimeIndex) -> list[str]:
    if (index == index.normalize()).all():
        return [t.strftime("%Y-%m-%d") for t in index]
    return [t.isoformat() for t in index]


def future_time(last, freq: str | None, horizon: int) -> list:
    """Labels of the `horizon` steps after the last observation (`last`: an ISO date or a position)."""
    if freq is None:
        return [int(last) + k for k in range(1, horizon + 1)]
    from pandas.tseries.frequencies import to_offset

    dates = pd.date_range(pd.Timestamp(last), periods=horizon + 1, freq=to_offset(freq))[1:]
    return _labels(dates)


def time_axis(labels: list) -> list:
    """Time labels as matplotlib x values: dates for ISO strings, the positions themselves otherwise."""
    if labels and isinstance(labels[0], str):
        return list(pd.to_datetime(labels))
    return list(labels)


def series_table() -> list[dict]:
    """The named series with what `aigc data list` shows."""
    rows = []
    for name, named in NAMED_SERIES.items():
        frame = named.frame()
        column = frame[named.column]
        rows.append({"name": name, "column": named.column, "freq": named.freq, "season": named.season,
                     "values": len(column), "missing": int(column.isna().sum()),
                     "start": _labels(frame.index[:1])[0], "description": named.description})
    return rows
