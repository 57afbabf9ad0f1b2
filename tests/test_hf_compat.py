"""A gpt run is a Hugging Face model folder; tokenizers agree with transformers' AutoTokenizer;
--init-from fine-tunes a local GPT-2; `generate` accepts any Hugging Face causal-LM folder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from aigc.data.tokenizer import TextTokenizer, train_bpe, train_char, transfer_ids
from aigc.errors import UserError
from aigc.modalities.text import load_split
from aigc.sample import GenerateSettings, generate, load_run
from aigc.service import train
from conftest import TINY_SETS, make_poems

MIXED = "床前明月光，疑是地上霜。\nHello, World! 42 tabs\tand  spaces 举头望明月"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_auto_tokenizer_encodes_and_decodes_like_ours(kind, tmp_path):
    docs = make_poems(10) + ["Hello, World! 42 tabs\tand  spaces", "床前明月光，疑是地上霜。举头望明月"]
    tok = train_char(docs) if kind == "char" else train_bpe(docs, 300)
    tok.save(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok.encode(MIXED)
    assert auto(MIXED, add_special_tokens=False)["input_ids"] == ids
    assert auto.decode(ids) == tok.decode(ids)
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == tok.eot_id
    if kind == "bpe":
        assert tok.decode(ids) == MIXED  # byte-level BPE covers every string
    else:  # characters never seen in training come back as <unk>
        vocab = tok.tokenizer.get_vocab()
        assert tok.decode(ids) == "".join(c if c in vocab else "<unk>" for c in MIXED)


def test_char_fast_path_equals_the_tokenizers_library():
    docs = make_poems(5) + ["ASCII\ttext\n\nwith lines", "emoji 🙂 and 汉字"]
    tok = train_char(docs)
    text = "".join(docs) + "未见过的字 ~"
    assert tok.encode(text) == tok.tokenizer.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode("".join(docs))) == "".join(docs)
    unk = tok.encode("未")
    assert unk == [tok.unk_id]


def test_gpt_run_loads_with_transformers_and_generates(poems_file):
    run_dir, _ = train("gpt", str(poems_file), name="hf", max_steps=4, sets=TINY_SETS["gpt"])
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == tokenizer.eos_token_id == 0
    assert json.loads((run_dir / "generation_config.json").read_text())["eos_token_id"] == 0
    prompt = tokenizer("春江", return_tensors="pt", add_special_tokens=False)
    ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), prompt["input_ids"]], dim=1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    ours, _ = generate(load_run("hf"), GenerateSettings(prompt="春江", temperature=0, max_new_tokens=10))
    continuation = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in continuation:
        continuation = continuation[: continuation.index(tokenizer.eos_token_id)]
    assert "春江" + tokenizer.decode(continuation, skip_special_tokens=True) == ours[0]


@pytest.fixture
def local_gpt2(tmp_path):
    """A tiny random GPT-2 with a byte-level BPE tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path / "tiny-gpt2"
    folder.mkdir()
    tok = train_bpe(["The quick brown fox jumps over the lazy dog. " * 20] + make_poems(5), 300)
    tok.save(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_init_from_a_local_gpt2_fine_tunes_it(local_gpt2, poems_file):
    before = GPT2LMHeadModel.from_pretrained(local_gpt2)
    run_dir, metrics = train("gpt", str(poems_file), name="ft", max_steps=4, init_from=str(local_gpt2),
                             sets={"block_size": "16", "batch_size": "4", "dtype": "fp32", "eval_interval": "2"})
    after = GPT2LMHeadModel.from_pretrained(run_dir)
    assert after.config.n_embd == 32 and after.config.n_layer == 2  # the checkpoint's architecture
    assert not torch.equal(before.transformer.wte.weight, after.transformer.wte.weight)  # it trained
    assert json.loads((run_dir / "tokenizer.json").read_text()) == json.loads(
        (local_gpt2 / "tokenizer.json").read_text())  # its tokenizer came with it
    assert "n_embd = 32" in (run_dir / "config.toml").read_text()
    with pytest.raises(UserError, match="n_layer comes from the --init-from checkpoint"):
        train("gpt", str(poems_file), name="ft2", max_steps=2, init_from=str(local_gpt2), sets={"n_layer": "3"})


def test_generate_accepts_a_plain_hugging_face_folder(local_gpt2):
    loaded = load_run(str(local_gpt2))
    assert loaded.family == "hf"
    a, _ = generate(loaded, GenerateSettings(prompt="The quick", seed=1, max_new_tokens=8))
    b, _ = generate(loaded, GenerateSettings(prompt="The quick", seed=1, max_new_tokens=8))
    assert a == b and a[0].startswith("The quick")


def test_bpe_run_reports_bits_per_character_not_per_token(poems_file):
    _, char_metrics = train("ngram", str(poems_file), name="c")
    _, bpe_metrics = train("rnn", str(poems_file), name="b", max_steps=2,
                           sets={**TINY_SETS["rnn"], "tokenizer": "bpe", "bpe_vocab_size": "300"})
    assert bpe_metrics["val_chars"] == char_metrics["val_chars"]  # same characters, whatever the tokens
    assert bpe_metrics["val_tokens"] != bpe_metrics["val_chars"]


def test_text_tokenizer_load_needs_a_tokenizer(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        TextTokenizer.load(tmp_path)


def test_transfer_ids_maps_each_character_to_the_checkpoints_id_or_its_unk():
    old = train_char(["春风又绿江南岸", "明月何时照我还"])
    new = train_char(["春江潮水连海平"])
    ids, found = transfer_ids(new, old)
    old_vocab = old.tokenizer.get_vocab()
    by_id = sorted(new.tokenizer.get_vocab().items(), key=lambda item: item[1])
    assert ids == [old_vocab[t] if t in old_vocab else old.unk_id for t, _ in by_id]
    assert ids[new.eot_id] == old.eot_id and ids[new.unk_id] == old.unk_id
    assert found == 4  # EOT, <unk>, 春, 江


def test_min_char_count_makes_rare_characters_unknown():
    tok = train_char(["春春春风风月"], min_count=2)
    assert tok.encode("春风月") == [tok.encode("春")[0], tok.encode("风")[0], tok.unk_id]
    assert tok.vocab_size == 4  # EOT, <unk>, 春, 风


def test_fine_tuning_a_char_gpt_keeps_its_own_vocabulary_with_the_checkpoints_embeddings(tmp_path):
    """A fine-tuned char run has the vocabulary of its own training split (as a run from scratch on the same
    data, so their bits/char compare); each character's embedding starts as the checkpoint's, or as the
    checkpoint's <unk> for a character it lacks."""
    base = tmp_path / "base.txt"
    base.write_text("\n".join(make_poems(30)), encoding="utf-8")
    target = tmp_path / "target.txt"
    target.write_text("潮水连海平，明月共潮生。\n" * 40, encoding="utf-8")
    pre_dir, _ = train("gpt", str(base), name="pre", max_steps=2, sets=TINY_SETS["gpt"])
    pre = GPT2LMHeadModel.from_pretrained(pre_dir)
    pre_tok = TextTokenizer.load(pre_dir)
    sets = {k: v for k, v in TINY_SETS["gpt"].items() if k not in ("n_layer", "n_head", "n_embd", "n_positions")}
    sets["lr"] = "1e-12"  # (almost) no step: the weights are still the transferred ones
    sets["resid_pdrop"] = "0.25"  # dropout is not architecture: a fine-tuning run sets its own
    ft_dir, metrics = train("gpt", str(target), name="ft", max_steps=1, init_from=str(pre_dir), sets=sets)
    tok = TextTokenizer.load(ft_dir)
    assert tok.tokenizer.get_vocab() == train_char(load_split(ft_dir)[0]).tokenizer.get_vocab()
    ft = GPT2LMHeadModel.from_pretrained(ft_dir)
    assert ft.config.vocab_size == tok.vocab_size == ft.transformer.wte.weight.shape[0]
    assert (ft.config.resid_pdrop, ft.config.attn_pdrop) == (0.25, pre.config.attn_pdrop)
    assert "resid_pdrop = 0.25" in (ft_dir / "config.toml").read_text()
    assert ft.lm_head.weight.data_ptr() == ft.transformer.wte.weight.data_ptr()  # still tied
    pre_vocab = pre_tok.tokenizer.get_vocab()
    for token, i in tok.tokenizer.get_vocab().items():
        source = pre_vocab.get(token, pre_tok.unk_id)
        torch.testing.assert_close(ft.transformer.wte.weight[i], pre.transformer.wte.weight[source],
                                   atol=1e-6, rtol=0)
    record = json.loads((ft_dir / "run.json").read_text())
    found = sum(t in pre_vocab for t in tok.tokenizer.get_vocab())
    assert record["vocab_from_checkpoint"] == {"tokens": tok.vocab_size, "found": found} and found < tok.vocab_size
    torch.testing.assert_close(ft.transformer.h[0].mlp.c_fc.weight, pre.transformer.h[0].mlp.c_fc.weight,
                               atol=1e-6, rtol=0)
    assert metrics["val_bpc"] > 0
    ours, _ = generate(load_run(str(ft_dir)), GenerateSettings(prompt="潮水", temperature=0, max_new_tokens=4))
    assert ours[0].startswith("潮水")
