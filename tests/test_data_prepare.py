"""`forge prepare`: documents -> shards -> the same ids and text; bad input; resume; workers."""
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forge.data import indexed
from forge.data.prepare import main, prepare
from forge.data.shards import ShardSet
from forge.data.sources import InputError
from forge.data.tokenizer import CharTokenizer, Tokenizer
from test_data_indexed import read_mmidx

DOCS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
        "All:\nSpeak, speak.", "Second Citizen:\nOne word, good citizens.", "x" * 40,
        "MENENIUS:\nWhat work's, my countrymen, in hand?"]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_all(out):
    """Every stored sequence, shard by shard, with the independent reader."""
    m = json.load(open(os.path.join(out, "manifest.json")))
    return [s for sh in m["shards"] for s in read_mmidx(os.path.join(out, sh["name"]))["seqs"]], m


def char_tok(tmp_path, docs=DOCS):
    tok = CharTokenizer.train(docs)
    return tok.save(str(tmp_path / "tok"))


def test_documents_to_shards_and_back(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    m = prepare([src], str(tmp_path / "out"), train_tokenizer="bpe", vocab_size=300, shard_size=60)
    seqs, _ = read_all(str(tmp_path / "out"))
    tok = Tokenizer.load(str(tmp_path / "out"))
    assert seqs == [tok.encode(d) + [tok.eod_id] for d in DOCS]
    assert [tok.decode(s[:-1]) for s in seqs] == DOCS
    assert m["totals"] == {"records": 5, "empty": 0, "invalid_utf8": 0, "split_documents": 0,
                           "documents": 5, "tokens": sum(map(len, seqs)), "shards": len(m["shards"])}
    assert all(s["tokens"] <= 60 for s in m["shards"]) and len(m["shards"]) > 1
    for s in m["shards"]:
        assert s["bin_sha256"] == indexed.file_sha256(str(tmp_path / "out" / (s["name"] + ".bin")))


def test_input_formats_give_the_same_documents(tmp_path):
    tok = char_tok(tmp_path)
    rows = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
    d = tmp_path / "in"
    d.mkdir()
    jsonl(d / "a.jsonl", rows[:2])
    json.dump(rows[2:3], open(d / "b.json", "w"))                         # a JSON array
    table = pa.table({"id": [3], "text": [DOCS[3]]})
    pq.write_table(table, d / "c.parquet")
    with pa.OSFile(str(d / "d.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(pa.table({"id": [4], "text": [DOCS[4]]}))
    expected = [CharTokenizer.train(DOCS).encode(x) + [len(set("".join(DOCS)))] for x in DOCS]
    for inputs in ([str(d)], [str(d / "*.*")], [str(d / p) for p in sorted(os.listdir(d))]):
        prepare(inputs, str(tmp_path / "out"), tokenizer=tok, overwrite=True)
        assert read_all(str(tmp_path / "out"))[0] == expected


@pytest.mark.parametrize("unit,docs", [("line", ["a b", "c", "d", "e f"]), ("paragraph", ["a b\nc", "d\ne f"]),
                                       ("file", ["a b\nc\n\n\nd\ne f\n"])])
def test_text_units(tmp_path, unit, docs):
    (tmp_path / "t.txt").write_text("a b\nc\n\n\nd\ne f\n")
    tok = char_tok(tmp_path, ["abcdef \n"])
    m = prepare([str(tmp_path / "t.txt")], str(tmp_path / "o"), tokenizer=tok, unit=unit)
    t = Tokenizer.load(tok)
    assert [t.decode(s[:-1]) for s in read_all(str(tmp_path / "o"))[0]] == docs
    assert m["totals"]["empty"] == (2 if unit == "line" else 0)


def test_empty_and_invalid_utf8_are_counted(tmp_path, caplog):
    (tmp_path / "t.txt").write_bytes(b"good line\n\n   \nbad \xff\xfe byte\nok\n")
    tok = char_tok(tmp_path, ["good lineabdytok \ufffd"])
    m = prepare([str(tmp_path / "t.txt")], str(tmp_path / "o"), tokenizer=tok)
    assert (m["totals"]["records"], m["totals"]["empty"], m["totals"]["invalid_utf8"]) == (5, 2, 1)
    assert m["totals"]["documents"] == 3
    t = Tokenizer.load(tok)
    assert t.decode(read_all(str(tmp_path / "o"))[0][1][:-1]) == "bad \ufffd\ufffd byte"
    assert f"{tmp_path / 't.txt'}:4: invalid UTF-8" in caplog.text


@pytest.mark.parametrize("content,message", [
    (b'{"text": "ok"}\n{"text": "bad \xff"}\n', r"b\.jsonl:2: invalid UTF-8"),
    (b'{"text": "ok"}\n\n{"body": "no text"}\n', r"b\.jsonl:3: no 'text' field \(fields: \['body'\]\)"),
    (b'{"text": "ok"}\n{"text": oops}\n', r"b\.jsonl:2: not valid JSON"),
    (b'{"text": 5}\n', r"b\.jsonl:1: field 'text' is a int"),
])
def test_bad_jsonl_is_refused_naming_file_and_line(tmp_path, content, message):
    (tmp_path / "b.jsonl").write_bytes(content)
    with pytest.raises(InputError, match=message):
        prepare([str(tmp_path / "b.jsonl")], str(tmp_path / "o"), tokenizer=char_tok(tmp_path, ["okbad"]),
                strict=True)
    assert not any(p.startswith("shard_") for p in os.listdir(tmp_path / "o"))


def test_missing_inputs_and_offline_hub(tmp_path, monkeypatch):
    tok = char_tok(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        prepare([str(tmp_path / "nope.jsonl")], str(tmp_path / "o"), tokenizer=tok)
    with pytest.raises(InputError, match="matches no"):
        prepare([str(tmp_path / "*.parquet")], str(tmp_path / "o"), tokenizer=tok)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(InputError, match="'someone/corpus' is not a local file.*unreachable.*HF_HUB_OFFLINE"):
        prepare(["someone/corpus"], str(tmp_path / "o2"), tokenizer=tok)
    assert time.monotonic() - t0 < 5


def test_vocabulary_too_large_for_dtype(tmp_path, capsys):
    big = CharTokenizer.from_alphabet(chr(0x20000 + i) for i in range(70000))
    path = big.save(str(tmp_path / "big"))
    (tmp_path / "a.txt").write_text(chr(0x20000) * 3)
    assert main(["--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "o"),
                 "--tokenizer", path, "--dtype", "uint16"]) == 2
    assert "70003 tokens does not fit the token dtype uint16" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "o2"), "--tokenizer", path]) == 0
    assert read_mmidx(str(tmp_path / "o2" / "shard_00000"))["code"] == 4      # int32 chosen


def test_long_documents_are_cut_to_the_shard_size(tmp_path):
    docs = ["a" * 25, "b" * 5, "c" * 3, "d" * 12]
    src = jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    m = prepare([src], str(tmp_path / "o"), tokenizer=char_tok(tmp_path, ["abcd"]), shard_size=10)
    seqs, _ = read_all(str(tmp_path / "o"))
    # a*25+EOD is cut 10/10/6; b+EOD (6) does not fit beside it and starts shard 3, c+EOD (4) fills
    # it; d*12+EOD is longer than a shard and is cut 10/3
    assert [s["tokens"] for s in m["shards"]] == [10, 10, 6, 10, 10, 3]
    assert [len(s) for s in seqs] == [10, 10, 6, 6, 4, 10, 3]
    t = Tokenizer.load(str(tmp_path / "o"))
    assert np.concatenate(seqs).tolist() == [i for d in docs for i in t.encode(d) + [t.eod_id]]
    assert m["totals"]["split_documents"] == 2 and m["totals"]["records"] == 4


def test_workers_give_identical_output(tmp_path):
    rows = [{"text": f"document {i} " + "word " * (i % 17)} for i in range(300)]
    src = jsonl(tmp_path / "d.jsonl", rows)
    prepare([src], str(tmp_path / "w1"), train_tokenizer="bpe", vocab_size=300, shard_size=1000)
    m1 = json.load(open(tmp_path / "w1" / "manifest.json"))
    tok = str(tmp_path / "w1" / "tokenizer.json")
    m2 = prepare([src], str(tmp_path / "w2"), tokenizer=tok, workers=2, shard_size=1000)
    assert [s["bin_sha256"] for s in m2["shards"]] == [s["bin_sha256"] for s in m1["shards"]]
    assert len(m1["shards"]) > 3


def crash_on_finish(monkeypatch, n):
    """Make the n-th shard completion die after writing its temporary files."""
    calls = {"n": 0}
    real = indexed.IndexedWriter.finish

    def finish(self):
        calls["n"] += 1
        if calls["n"] == n:
            self._bin.close()
            raise KeyboardInterrupt("simulated crash")
        return real(self)
    monkeypatch.setattr(indexed.IndexedWriter, "finish", finish)


@pytest.mark.parametrize("crash_at", [2, 3])
def test_crash_mid_shard_then_resume_matches_a_clean_run(tmp_path, monkeypatch, crash_at):
    docs = ["a" * 25, "", "b" * 5, "c" * 3, "d" * 12, "e" * 4]
    src = jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    tok = char_tok(tmp_path, ["abcde"])
    clean = prepare([src], str(tmp_path / "clean"), tokenizer=tok, shard_size=10)
    crash_on_finish(monkeypatch, crash_at)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], str(tmp_path / "o"), tokenizer=tok, shard_size=10)
    partial = json.load(open(tmp_path / "o" / "manifest.json"))
    assert not partial["complete"] and len(partial["shards"]) == crash_at - 1
    for s in partial["shards"]:                                   # what it lists is whole and verified
        assert indexed.file_sha256(str(tmp_path / "o" / (s["name"] + ".bin"))) == s["bin_sha256"]
    with pytest.raises(ValueError, match="incomplete"):
        ShardSet(str(tmp_path / "o"))
    monkeypatch.undo()
    resumed = prepare([src], str(tmp_path / "o"), tokenizer=tok, shard_size=10)
    assert [s["bin_sha256"] for s in resumed["shards"]] == [s["bin_sha256"] for s in clean["shards"]]
    assert resumed["totals"] == clean["totals"]
    assert sorted(os.listdir(tmp_path / "o")) == sorted(os.listdir(tmp_path / "clean"))


def test_rerun_with_other_settings_is_refused(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    tok = char_tok(tmp_path)
    prepare([src], str(tmp_path / "o"), tokenizer=tok, shard_size=100)
    with pytest.raises(ValueError, match=r"other settings \(differing: \['shard_size'\]\)"):
        prepare([src], str(tmp_path / "o"), tokenizer=tok, shard_size=50)
    m = prepare([src], str(tmp_path / "o"), tokenizer=tok, shard_size=50, overwrite=True)
    assert all(s["tokens"] <= 50 for s in m["shards"])


def test_cli_dispatch(tmp_path):
    from forge.cli import main as forge_main
    src = jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    assert forge_main(["prepare", "--input", src, "--output", str(tmp_path / "o"), "--train-tokenizer", "char"]) == 0
    assert ShardSet(str(tmp_path / "o")).num_docs == len(DOCS)
    assert forge_main(["prepare", "--input", src, "--output", str(tmp_path / "o2"), "--tokenizer",
                       str(tmp_path / "o"), "--text-key", "body"]) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_text_the_tokenizer_cannot_encode_names_file_and_line(tmp_path, workers):
    (tmp_path / "t.txt").write_text("abc\ncab\nabz\n")
    with pytest.raises(InputError, match=r"t\.txt:3: .*\['z'\]"):
        prepare([str(tmp_path / "t.txt")], str(tmp_path / "o"), tokenizer=char_tok(tmp_path, ["abc"]),
                workers=workers)


def test_columnar_input_without_the_text_key_names_file_and_row(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"c\.parquet:row 1: no 'text' field \(fields: \['body'\]\)"):
        prepare([str(tmp_path / "c.parquet")], str(tmp_path / "o"), tokenizer=char_tok(tmp_path, ["ab"]))


def test_output_inside_an_input_folder_is_not_read_back(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    jsonl(d / "a.jsonl", [{"text": x} for x in DOCS])
    tok = char_tok(tmp_path)
    first = prepare([str(d)], str(d / "out"), tokenizer=tok)
    again = prepare([str(d)], str(d / "out"), tokenizer=tok)          # same inputs: a no-op rerun
    assert again["totals"] == first["totals"] and again["totals"]["documents"] == len(DOCS)
