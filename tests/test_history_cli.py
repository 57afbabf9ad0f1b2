"""The store from the command line: `aigc generate` records what it makes (`--no-record` skips), chat with
--message answers as the API's chat does, `aigc history` lists and exports, `aigc keys` makes, lists and
revokes API keys."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from aigc import service
from aigc.cli import app
from aigc.db import Store

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def poet(poems_file):
    service.train("ngram", str(poems_file), name="poet", sets={"max_order": "4"})
    return "poet"


def test_generate_records_and_history_lists_and_exports(poet, aigc_home, tmp_path):
    made = invoke("generate", poet, "--prompt", "春", "-n", "2", "--seed", "4", "--max-new-tokens", "12", "--json")
    assert made.exit_code == 0, made.output
    samples = json.loads(made.stdout)["samples"]
    assert "recorded as gen-" in made.stderr
    skipped = invoke("generate", poet, "--seed", "5", "--no-record")
    assert skipped.exit_code == 0 and "recorded" not in skipped.stderr
    with Store() as db:
        [row] = db.list_generations()
    assert (row["run"], row["source"], row["seed"], row["output"]) == ("poet", "cli", 4, samples)
    assert row["request"]["prompt"] == "春" and row["completion_tokens"] > 0

    listed = invoke("history", "--json")
    assert [g["id"] for g in json.loads(listed.stdout)["generations"]] == [row["id"]]
    with Store() as db:
        db.add_rating(row["id"], score=1, comment="好")
    assert "rated +1" in invoke("history", "--rated").stdout
    out = tmp_path / "feedback.jsonl"
    exported = invoke("history", "export", out)
    assert exported.exit_code == 0 and "wrote 1 generations" in exported.stderr
    [line] = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["ratings"][0]["comment"] == "好"


def test_message_is_chat_the_reply_without_the_prompt(poet):
    chat = invoke("generate", poet, "--message", "月", "--seed", "3", "--max-new-tokens", "16", "--json")
    whole = invoke("generate", poet, "--prompt", "月", "--seed", "3", "--max-new-tokens", "16", "--json")
    assert chat.exit_code == 0, chat.output
    assert json.loads(chat.stdout)["samples"] == [json.loads(whole.stdout)["samples"][0][1:]]
    both = invoke("generate", poet, "--message", "月", "--prompt", "月")
    assert both.exit_code == 1 and "exclude each other" in both.stderr


def test_image_generations_record_the_files_written(tmp_path):
    service.train("vae", "digits", name="digits", max_steps=2, sets={
        "z_dim": "4", "base_channels": "8", "batch_size": "16", "eval_interval": "2", "warmup_steps": "1",
        "dtype": "fp32", "log_interval": "1"})
    made = invoke("generate", "digits", "-n", "3", "--seed", "1", "--out", tmp_path / "pics")
    assert made.exit_code == 0, made.output
    with Store() as db:
        rows = db.list_generations()
    assert sorted(r["file"] for r in rows) == [str(tmp_path / "pics" / f"{i:03d}.png") for i in range(3)]
    assert sorted(r["seed"] for r in rows) == [1, 2, 3]


def test_keys_create_list_revoke(aigc_home):
    made = invoke("keys", "create", "laptop")
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()
    with Store() as db:
        assert db.check_key(secret) is not None
    listed = json.loads(invoke("keys", "list", "--json").stdout)["keys"]
    assert [k["name"] for k in listed] == ["laptop"] and secret not in json.dumps(listed)
    assert invoke("keys", "create", "laptop").exit_code == 1  # the name is taken
    assert invoke("keys", "revoke", "laptop").exit_code == 0
    with Store() as db:
        assert db.check_key(secret) is None and not db.has_keys()
    missing = invoke("keys", "revoke", "nobody")
    assert missing.exit_code == 1 and "error:" in missing.stderr


def test_history_on_an_empty_store_says_so():
    result = invoke("history")
    assert result.exit_code == 0 and "no generations recorded yet" in result.stderr
