"""Tokenizers: char and byte-level BPE, saved as tokenizer.json that transformers reads identically."""
import json

import pytest
from transformers import AutoTokenizer

from forge.data.tokenizer import EOD, CharTokenizer, Tokenizer, train_bpe

CORPUS = ["First Citizen:\nBefore we proceed any further, hear me speak.\n",
          "All:\nSpeak, speak.\n", "Ünïcödé façade — naïve 東京 🙂\n"] * 20


def test_char_tokenizer_ids_and_round_trip():
    tok = CharTokenizer.train(["hello world\n", "abc"])
    alphabet = sorted(set("hello world\nabc"))
    assert tok.alphabet == "".join(alphabet)
    assert tok.encode("hello") == [alphabet.index(c) for c in "hello"]
    assert (tok.eod_id, tok.bos_id, tok.pad_id) == (len(alphabet), len(alphabet) + 1, len(alphabet) + 2)
    assert tok.vocab_size == len(alphabet) + 3
    assert tok.decode(tok.encode("hello world\nabc")) == "hello world\nabc"


def test_char_tokenizer_names_characters_it_cannot_encode():
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(ValueError, match=r"\['x', 'z'\]"):
        tok.encode("axbz")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_saved_file_loads_back_and_in_transformers(tmp_path, kind):
    tok = CharTokenizer.train(CORPUS) if kind == "char" else train_bpe(CORPUS, vocab_size=300)
    tok.save(str(tmp_path))
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        back = Tokenizer.load(str(path))
        assert type(back) is type(tok)
        assert (back.eod_id, back.bos_id, back.pad_id, back.vocab_size) == \
               (tok.eod_id, tok.bos_id, tok.pad_id, tok.vocab_size)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "".join(CORPUS[:3])
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.eos_token_id == tok.eod_id and hf.pad_token_id == tok.pad_id
    assert tok.decode(tok.encode(text)) == text


def test_bpe_specials_first_and_any_text_round_trips():
    tok = train_bpe(CORPUS, vocab_size=300)
    assert [tok.eod_id, tok.bos_id, tok.pad_id] == [0, 1, 2]
    assert tok.vocab_size == 300
    unseen = "Zebra ψ 𝔘 \t\r\n  spaces"
    assert tok.decode(tok.encode(unseen)) == unseen
    assert tok.encode(EOD) == [0]


def test_load_guesses_special_tokens_without_config(tmp_path):
    from tokenizers import Tokenizer as Backend, models
    backend = Backend(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    backend.add_special_tokens(["</s>", "<s>", "<pad>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(str(tmp_path))
    assert (tok.eod_id, tok.bos_id, tok.pad_id) == (2, 3, 4)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>", "pad_token": None}))
    tok = Tokenizer.load(str(tmp_path))
    assert tok.eod_id == 3 and tok.pad_id == 4      # config wins; missing values fall back to names


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(str(tmp_path / "nope.json"))
    from tokenizers import Tokenizer as Backend, models
    Backend(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no end-of-document token"):
        Tokenizer.load(str(tmp_path))
