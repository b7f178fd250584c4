"""The embedded Shakespeare corpus and `build_data(dataset=shakespeare)`."""
import re
import threading

import pytest

from forge.config import DataConfig
from forge.data import batch_iterator, build_data
from forge.data.shakespeare import parse_play, play_files, shakespeare_documents, shakespeare_text

SPEAKER = re.compile(r"^[A-Za-z][A-Za-z0-9 ,.'&-]*:$")


def test_corpus_shape():
    train, val = shakespeare_documents("train"), shakespeare_documents("val")
    assert len(play_files()) == len(train) == len(val) == 38
    text = shakespeare_text("train") + shakespeare_text("val")
    assert text.isascii() and not set(text) & set("*_#[]\\")
    for t, v in zip(train, val):
        assert 0.03 < len(v) / (len(t) + len(v)) < 0.08           # the last ~5% of each play
        for doc in (t, v):
            for speech in doc.rstrip("\n").split("\n\n"):
                head, *lines = speech.split("\n")
                assert SPEAKER.match(head), head
                assert lines and all(line.strip() for line in lines)
    assert shakespeare_text("train") == "".join(train)
    with pytest.raises(ValueError):
        shakespeare_documents("test")


def test_speeches_match_the_markdown():
    macbeth = next(p for p in play_files() if p.endswith("macbeth.md"))
    md = open(macbeth, encoding="utf-8").read()
    speeches = parse_play(md)
    assert speeches[0] == "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?"
    assert speeches[1:4] == ["Second Witch:\nWhen the hurlyburly's done,\nWhen the battle's lost and won.",
                             "Third Witch:\nThat will be ere the set of sun.", "First Witch:\nWhere the place?"]
    assert "ALL:\nFair is foul, and foul is fair:\nHover through the fog and filthy air." in speeches
    # every speaker line of the markdown gives one speech, except those with no spoken line
    assert 0.99 * md.count("\n**") <= len(speeches) <= md.count("\n**")
    # stage directions are gone, spoken lines after them kept with their speaker
    joined = "\n".join(speeches)
    assert "_Exit Sergeant, attended_" in md and "Exit Sergeant" not in joined
    assert "Thunder and lightning" in md and "Thunder and lightning" not in joined
    assert "DUNCAN:\nSo well thy words become thee as thy wounds;\nThey smack of honour both. " \
           "Go get him surgeons.\nWho comes here?" in joined


def test_build_data_shakespeare_char(tmp_path):
    cfg = DataConfig(dataset="shakespeare", tokenizer="char", seq_len=32, cache_dir=str(tmp_path))
    results = {}
    waiter = threading.Thread(target=lambda: results.update(r1=build_data(cfg, seed=0, rank=1, world_size=2)))
    waiter.start()                                                # rank 1 waits for rank 0's build
    b = build_data(cfg, seed=0, rank=0, world_size=2)
    waiter.join(timeout=60)
    assert [p.name for p in tmp_path.iterdir()] == ["shakespeare_char"]          # no temporaries left
    text = shakespeare_text("train")
    assert b.tokenizer.vocab_size == len(set(text + shakespeare_text("val"))) + 3
    assert len(b.train) == (len(text) + 38 - 1) // 32 and len(b.valid) > 0      # +1 EOD per play
    x = next(batch_iterator(b.train, 4, dp_rank=1, dp_size=2))
    assert x.shape == (4, 33)
    assert all(b.tokenizer.decode(row.tolist()).replace("<|endoftext|>", "") in text for row in x
               if b.tokenizer.eod_id not in row.tolist())
    r1 = results["r1"]
    assert next(batch_iterator(r1.train, 4, dp_rank=1, dp_size=2)).tolist() == x.tolist()


def test_build_data_shakespeare_bpe_uses_the_saved_tokenizer(tmp_path):
    from forge.data.tokenizer import Tokenizer
    cfg = DataConfig(dataset="shakespeare", tokenizer="bpe", vocab_size=400, seq_len=64, cache_dir=str(tmp_path))
    b = build_data(cfg, seed=0)
    saved = Tokenizer.load(str(tmp_path / "shakespeare_bpe400" / "train"))
    assert b.tokenizer.vocab_size == 400 and b.tokenizer.sha256() == saved.sha256()
    text = shakespeare_text("train")
    row = next(batch_iterator(b.train, 1, consumed_samples=17))[0].tolist()
    pieces = b.tokenizer.decode(row).split("<|endoftext|>")
    assert all(p in text for p in pieces)
