"""Typed configuration (src/aigc/config.py): coercion of `--set` strings and TOML values, ranges,
TOML files with sections, unknown keys, and the TOML round trip of every family's sections."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass

import pytest

from aigc.config import DataConfig, TrainConfig, build, coerce, describe, option, parse_sets, read_toml, to_toml
from aigc.errors import UserError
from aigc.models import FAMILIES
from aigc.models.gpt import GPTTrainConfig
from aigc.service import sections_for


@dataclass
class Knobs:
    count: int = option(3, "an int in 0..10", min=0, max=10)
    rate: float = option(0.5, "a float in (0, 1]", min=0.0, max=1.0, min_exclusive=True)
    scale: float = option(1.0, "any finite float")
    flag: bool = option(False, "a bool")
    mode: str = option("a", "one of a, b", choices=("a", "b"))
    label: str = option("x", "any string")


F = {f.name: f for f in dataclasses.fields(Knobs)}


def c(key, value):
    return coerce(key, value, F[key])


def error(key, value) -> str:
    with pytest.raises(UserError) as info:
        c(key, value)
    message = str(info.value)
    assert message.startswith(f"{key}: "), message  # every error names the key
    return message


# --- coerce ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, text, expected", [
    ("count", "7", 7), ("count", " 7 ", 7), ("count", "0", 0), ("count", "10", 10),
    ("rate", "0.25", 0.25), ("rate", "1e-3", 0.001), ("rate", "1", 1.0), ("scale", "-2.5", -2.5),
    ("flag", "true", True), ("flag", "True", True), ("flag", "1", True), ("flag", "yes", True),
    ("flag", "false", False), ("flag", "FALSE", False), ("flag", "0", False), ("flag", "no", False),
    ("mode", "b", "b"), ("label", "hello world", "hello world"), ("label", "", ""),
])
def test_coerce_from_strings(key, text, expected):
    value = c(key, text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("key, value", [
    ("count", 4), ("rate", 0.75), ("scale", -1e300), ("flag", True), ("flag", False), ("mode", "a"),
    ("label", "诗"),
])
def test_coerce_toml_values_pass_unchanged(key, value):
    result = c(key, value)
    assert result == value and type(result) is type(value)


def test_coerce_int_accepted_for_float():
    value = c("rate", 1)
    assert value == 1.0 and type(value) is float
    assert type(c("scale", -3)) is float


@pytest.mark.parametrize("key, value, words", [
    ("count", True, "expected int"),  # bool is an int subclass in Python, never in a config
    ("count", False, "expected int"),
    ("count", "true", "expected int"),
    ("count", 2.0, "expected int"),
    ("count", "2.5", "expected int"),
    ("count", "abc", "'abc'"),
    ("count", "", "expected int"),
    ("rate", True, "expected float"),
    ("rate", "fast", "expected float"),
    ("rate", "0.5.1", "expected float"),
    ("flag", 1, "expected bool"),
    ("flag", "maybe", "expected bool"),
    ("flag", "", "expected bool"),
    ("mode", 1, "expected str"),
    ("label", 2.5, "expected str"),
])
def test_coerce_rejects_wrong_types(key, value, words):
    assert words in error(key, value)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", float("nan"), float("inf"),
                                   float("-inf")])
@pytest.mark.parametrize("key", ["rate", "scale"])
def test_coerce_rejects_non_finite(key, value):
    assert "finite" in error(key, value)


@pytest.mark.parametrize("key, value, words", [
    ("count", -1, ">= 0"), ("count", "11", "<= 10"), ("count", 11, "<= 10"),
    ("rate", 0, "> 0.0"), ("rate", "0.0", "> 0.0"), ("rate", -0.1, "> 0.0"), ("rate", 1.0000001, "<= 1.0"),
    ("mode", "c", "one of a, b"), ("mode", "A", "one of a, b"),
])
def test_coerce_ranges_and_choices(key, value, words):
    assert words in error(key, value)


@pytest.mark.parametrize("key, value", [("count", 0), ("count", 10), ("rate", 1.0), ("rate", 1e-12)])
def test_coerce_bounds_are_inclusive_unless_exclusive(key, value):
    assert c(key, value) == value


def test_every_default_is_valid_and_documented():
    """The defaults of every family's sections pass their own checks, and each field has a help line."""
    for family in FAMILIES:
        for config_type in sections_for(family).values():
            for f in dataclasses.fields(config_type):
                assert f.metadata.get("help"), f"{config_type.__name__}.{f.name} has no help line"
                assert coerce(f.name, f.default, f) == f.default


# --- parse_sets -----------------------------------------------------------------------------------

def test_parse_sets():
    assert parse_sets([]) == {}
    assert parse_sets(["n_layer=2", "cell=gru"]) == {"n_layer": "2", "cell": "gru"}
    assert parse_sets(["text_field=a=b"]) == {"text_field": "a=b"}  # split at the first '='
    assert parse_sets([" lr =0.1"]) == {"lr": "0.1"}
    assert parse_sets(["label="]) == {"label": ""}
    assert parse_sets(["n_layer=2", "n_layer=3"]) == {"n_layer": "3"}  # the last one wins


@pytest.mark.parametrize("pair", ["n_layer", "=2", " =2", ""])
def test_parse_sets_rejects_pairs_without_key_or_equals(pair):
    with pytest.raises(UserError, match="key=value"):
        parse_sets(["lr=0.1", pair])


# --- read_toml ------------------------------------------------------------------------------------

def write(tmp_path, text: str, name: str = "c.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_toml_flattens_sections_and_top_level(tmp_path):
    path = write(tmp_path, 'seed = 3\n\n[run]\nfamily = "gpt"\n\n[model]\nn_layer = 2\ncell = "gru"\n\n'
                           '[data]\ntokenizer = "bpe"\n\n[train]\nlr = 0.01\nbatch_size = 8\n')
    assert read_toml(path) == {"seed": 3, "n_layer": 2, "cell": "gru", "tokenizer": "bpe", "lr": 0.01,
                               "batch_size": 8}  # [run] is a record for people, not configuration


def test_read_toml_empty_file(tmp_path):
    assert read_toml(write(tmp_path, "")) == {}


def test_read_toml_unknown_section(tmp_path):
    with pytest.raises(UserError, match=r"unknown section \[optim\]"):
        read_toml(write(tmp_path, "[optim]\nlr = 0.1\n"))


@pytest.mark.parametrize("text", ["lr = = 1\n", "[model\nn_layer = 2\n", "n_layer = 2\nn_layer = 3\n",
                                  'cell = "gru\n'])
def test_read_toml_invalid(tmp_path, text):
    with pytest.raises(UserError, match="not valid TOML"):
        read_toml(write(tmp_path, text, "bad.toml"))


def test_read_toml_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('label = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(UserError, match="latin1.toml"):
        read_toml(path)


def test_read_toml_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        read_toml(tmp_path / "nope.toml")


# --- build ----------------------------------------------------------------------------------------

def test_build_fills_sections_from_flat_values():
    configs = build(sections_for("rnn"), {"cell": "gru", "n_layer": "3", "lr": 0.01, "tokenizer": "bpe"},
                    family="rnn")
    assert set(configs) == {"model", "data", "train"}
    assert configs["model"].cell == "gru" and configs["model"].n_layer == 3
    assert configs["train"].lr == 0.01 and configs["data"].tokenizer == "bpe"
    assert configs["train"].batch_size == TrainConfig().batch_size  # the rest keeps its defaults
    assert build(sections_for("gpt"), {}, family="gpt")["train"] == GPTTrainConfig()  # the family's own defaults
    assert GPTTrainConfig().lr != TrainConfig().lr and GPTTrainConfig().batch_size == TrainConfig().batch_size


@pytest.mark.parametrize("family, key", [("rnn", "n_heads"), ("gpt", "cell"), ("ngram", "lr"),
                                         ("ngram", "block_size"), ("rnn", "model")])
def test_build_rejects_unknown_keys_naming_them(family, key):
    with pytest.raises(UserError) as info:
        build(sections_for(family), {"tokenizer": "char", key: "1"}, family=family)
    message = str(info.value)
    assert f"unknown key {key!r}" in message and family in message


def test_build_reports_bad_values_by_key():
    with pytest.raises(UserError, match=r"^dropout: must be <= 0.9"):
        build(sections_for("rnn"), {"dropout": "2"}, family="rnn")
    with pytest.raises(UserError, match=r"^n_layer: expected int"):
        build(sections_for("gpt"), {"n_layer": "abc"}, family="gpt")


def test_sections_per_family():
    assert list(sections_for("ngram")) == ["model", "data"]  # no training loop, no [train]
    assert list(sections_for("rnn")) == ["model", "data", "train"]
    assert sections_for("gpt")["data"] is DataConfig
    assert list(sections_for("vae")) == ["model", "data", "train"]  # an image family
    with pytest.raises(UserError, match="unknown family 'nosuch'"):
        sections_for("nosuch")


# --- to_toml -> read_toml -> build ----------------------------------------------------------------

def _changed(value):
    """A different valid-looking value of the same type (checked by coerce below)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 3 if value else 0.1 / 3  # not a short decimal: repr must round-trip
    return value


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("variant", ["defaults", "changed"])
def test_toml_round_trip(family, variant, tmp_path):
    sections = sections_for(family)
    configs = {name: config_type() for name, config_type in sections.items()}
    if variant == "changed":
        for obj in configs.values():
            for f in dataclasses.fields(obj):
                value = _changed(getattr(obj, f.name))
                try:
                    setattr(obj, f.name, coerce(f.name, value, f))
                except UserError:  # at its upper bound or a choice: keep the default
                    pass
        configs["data"].text_field = 'say "诗"\\n\nnext'  # quotes, a backslash, a newline, CJK
    header = {"family": family, "data": "C:\\corpora\\poems.txt", "aigc_version": "0.1.0"}
    path = tmp_path / "config.toml"
    path.write_text(to_toml(configs, header), encoding="utf-8")
    rebuilt = build(sections, read_toml(path), family=family)
    assert rebuilt == configs
    if variant == "changed":
        assert rebuilt["data"] != DataConfig()
        assert tomllib.loads(path.read_text(encoding="utf-8"))["run"] == header


# --- describe -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_describe_lists_every_field(family):
    sections = sections_for(family)
    text = describe(sections)
    lines = text.splitlines()
    for section, config_type in sections.items():
        assert f"[{section}]" in lines
        for f in dataclasses.fields(config_type):
            line = next((ln for ln in lines if ln.startswith(f"  {f.name} = ")), None)
            assert line is not None, f.name
            assert line.startswith(f"  {f.name} = {f.default!r}")
            assert f.metadata["help"] in line
            if f.metadata.get("choices"):
                assert "(" + "|".join(f.metadata["choices"]) + ")" in line
    n_fields = sum(len(dataclasses.fields(t)) for t in sections.values())
    assert len(lines) == n_fields + len(sections)


def test_describe_of_a_custom_config():
    assert describe({"knobs": Knobs}).splitlines() == [
        "[knobs]",
        "  count = 3  # an int in 0..10",
        "  rate = 0.5  # a float in (0, 1]",
        "  scale = 1.0  # any finite float",
        "  flag = False  # a bool",
        "  mode = 'a' (a|b)  # one of a, b",
        "  label = 'x'  # any string",
    ]
