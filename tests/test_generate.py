"""Sampling helpers against hand-computed examples, `generate` semantics, checkpoint resolution,
the `forge generate` CLI (one-shot, interactive, clear errors)."""
import io

import pytest
import torch

from forge.config import ModelConfig
from forge.generate import (GenerationError, generate, main, resolve_model_folder, sample_next,
                            top_k_filter, top_p_filter)
from forge.models.transformer import build_model
from tests.helpers import save_char_model


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes: see conftest.one_thread


NEG = float("-inf")


# ------------------------------------------------------------------ sampling helpers
def test_top_k_filter_hand_example():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, -1.0, 4.0, 4.0]])
    out = top_k_filter(logits, 2)
    assert torch.equal(out, torch.tensor([[NEG, 3.0, 2.0, NEG], [NEG, NEG, 4.0, 4.0]]))
    # ties with the k-th value are kept
    assert torch.equal(top_k_filter(torch.tensor([3.0, 1.0, 1.0, 0.0]), 2), torch.tensor([3.0, 1.0, 1.0, NEG]))
    for k in (None, 0, 4, 10):
        assert torch.equal(top_k_filter(logits, k), logits)


def test_top_p_filter_hand_example():
    # probabilities 0.15, 0.5, 0.05, 0.3 (unsorted on purpose); in descending order 0.5, 0.3, 0.15, 0.05
    # with mass ahead of each 0, 0.5, 0.8, 0.95
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()
    assert kept(0.7) == [False, True, False, True]          # 0.5 < 0.7 <= 0.8: two tokens
    assert kept(0.5) == [False, True, False, False]         # the top token alone reaches 0.5
    assert kept(0.81) == [True, True, False, True]          # 0.8 < 0.81: the third joins
    assert kept(0.99) == [True, True, True, True]
    assert kept(0.01) == [False, True, False, False]        # the most likely token always stays
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    kept_values = top_p_filter(logits, 0.7)
    assert torch.equal(kept_values[[1, 3]], logits[[1, 3]])  # survivors keep their logits
    # batched: each row on its own
    two = torch.stack([logits, logits.flip(0)])
    assert torch.isfinite(top_p_filter(two, 0.7)).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_sample_next_greedy_and_seeded():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 4.9]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    assert sample_next(logits, temperature=1.0, top_k=1).tolist() == [1, 0]
    flat = torch.zeros(1, 50)
    a = [int(sample_next(flat, 1.0, generator=torch.Generator().manual_seed(7))) for _ in range(3)]
    b = [int(sample_next(flat, 1.0, generator=torch.Generator().manual_seed(7))) for _ in range(3)]
    assert a == b
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(flat, 1.0, top_k=3, generator=g)) for _ in range(200)}
    assert draws <= set(range(50)) and len(draws) > 1
    g = torch.Generator().manual_seed(0)
    ranked = torch.arange(50.0).unsqueeze(0)           # top-3 are ids 47, 48, 49
    assert {int(sample_next(ranked, 1.0, top_k=3, generator=g)) for _ in range(100)} <= {47, 48, 49}


# ------------------------------------------------------------------ generate()
def _model(max_seq_len=32, vocab=50, **kw):
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_seq_len=max_seq_len, **kw))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.12)
    return m


def test_generate_shapes_seed_and_mode():
    m = _model().train()
    ids = torch.randint(0, 50, (3, 4))
    a = generate(m, ids, 6, temperature=1.0, top_k=10, top_p=0.9, seed=5)
    b = generate(m, ids, 6, temperature=1.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 10) and torch.equal(a, b) and torch.equal(a[:, :4], ids)
    assert m.training                                  # the mode is restored
    assert generate(m, ids, 0, temperature=0).shape == (3, 4)


def test_generate_context_limits():
    m = _model(max_seq_len=12)
    with pytest.raises(GenerationError, match="longer than the model's context of 12"):
        generate(m, torch.zeros(1, 13, dtype=torch.long), 1)
    out = generate(m, torch.zeros(1, 10, dtype=torch.long), 5, temperature=0)   # slides past the context
    assert out.shape == (1, 15)
    with pytest.raises(GenerationError, match="vocabulary"):
        generate(m, torch.full((1, 2), 50), 1)
    with pytest.raises(GenerationError, match="empty"):
        generate(m, torch.zeros(1, 0, dtype=torch.long), 1)
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(GenerationError, match="temperature"):
            generate(m, torch.zeros(1, 2, dtype=torch.long), 1, temperature=bad)
    with pytest.raises(GenerationError, match="top_p"):
        generate(m, torch.zeros(1, 2, dtype=torch.long), 1, top_p=1.5)


def _greedy_sliding_reference(model, ids, n, ctx):
    """Greedy decoding with no cache: each token from a fresh forward pass over the window the
    module doc defines (start moves to L - (ctx - 1) whenever L - start would exceed ctx)."""
    seq, start, windows = ids.clone(), 0, []
    with torch.no_grad():
        for _ in range(n):
            if seq.shape[1] - start > ctx:
                start = seq.shape[1] - (ctx - 1)
            windows.append(seq.shape[1] - start)
            nxt = model(seq[:, start:])[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq, windows


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_generate_slides_past_the_context(position):
    ctx = 10
    m = _model(max_seq_len=ctx, position=position).eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    n = 3 * ctx                                        # several slides
    ref, windows = _greedy_sliding_reference(m, ids, n, ctx)
    assert max(windows) == ctx and windows[-4:] in ([ctx - 1, ctx] * 2, [ctx, ctx - 1] * 2)
    cached = generate(m, ids, n, temperature=0)
    plain = generate(m, ids, n, temperature=0, use_cache=False)
    assert cached.shape == (2, 6 + n)
    assert torch.equal(cached, ref) and torch.equal(plain, ref)
    # the tokens before the slide are ordinary full-sequence greedy decoding
    with torch.no_grad():
        assert torch.equal(m(ref[:, :ctx])[:, -1].argmax(-1), ref[:, ctx])
    # sliding changes the outcome: conditioning on the whole history (a too-long input for the
    # model) is not what happened; conditioning on the last ctx-1 tokens after the slide is
    with torch.no_grad():
        L = ctx + 1
        assert torch.equal(m(ref[:, L - (ctx - 1):L])[:, -1].argmax(-1), ref[:, L])


def test_generate_eos_pads_finished_rows_and_stops():
    m = _model()
    ids = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(0))
    ref = generate(m, ids, 10, temperature=0)
    eos = int(ref[0, 5])                               # row 0 emits this as its 3rd new token
    out = generate(m, ids, 10, temperature=0, eos_id=eos)
    first = [int((out[r, 3:] == eos).nonzero()[0]) if (out[r, 3:] == eos).any() else None for r in range(2)]
    assert first[0] is not None and first[0] <= 2
    for r in range(2):
        if first[r] is not None:                       # after eos a row holds only eos
            assert bool((out[r, 3 + first[r]:] == eos).all())
            assert torch.equal(out[r, :3 + first[r]], ref[r, :3 + first[r]])
    if all(f is not None for f in first):              # everyone finished: generation stopped early
        assert out.shape[1] == 3 + max(first) + 1


# ------------------------------------------------------------------ checkpoints and the CLI
def _save_folder(path, max_seq_len=48):
    return save_char_model(path, str(path) + "-tok", max_seq_len, std=0.1)


def _run_dir(tmp_path):
    run = tmp_path / "run"
    for step, complete in ((100, True), (200, True), (300, False)):
        d = run / "checkpoints" / f"step_{step:08d}"
        _save_folder(d / "model")
        if complete:
            (d / "COMPLETE").write_text("")
    return run


def test_resolve_model_folder(tmp_path):
    run = _run_dir(tmp_path)
    newest_complete = str(run / "checkpoints" / "step_00000200" / "model")
    assert resolve_model_folder(str(run)) == newest_complete
    assert resolve_model_folder(str(run / "checkpoints" / "step_00000100")).endswith("step_00000100/model")
    assert resolve_model_folder(newest_complete) == newest_complete
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_model_folder(str(run / "checkpoints" / "step_00000300"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_folder(str(tmp_path / "nope"))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_model_folder(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model_folder(str(tmp_path))


def _cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_greedy_matches_generate(tmp_path, capsys):
    model, tok = _save_folder(tmp_path / "m")
    argv = ["--checkpoint", str(tmp_path / "m"), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0"]
    ids = torch.tensor([tok.encode("ROMEO:")])
    ref = generate(model, ids, 12, temperature=0, eos_id=tok.eod_id)[0, ids.shape[1]:].tolist()
    ref = ref[: ref.index(tok.eod_id)] if tok.eod_id in ref else ref
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    assert out == "ROMEO:" + tok.decode(ref) + "\n"          # the prompt echoed, then its continuation
    code, out, err = _cli(argv + ["--no-echo"], capsys)
    assert code == 0 and out == tok.decode(ref) + "\n"


def test_cli_generates_past_the_context(tmp_path, capsys):
    model, tok = _save_folder(tmp_path / "m", max_seq_len=16)
    code, out, err = _cli(["--checkpoint", str(tmp_path / "m"), "--prompt", "to be", "--max-new-tokens", "40",
                           "--temperature", "0", "--ignore-eod", "--no-echo"], capsys)
    assert code == 0 and "context is 16 tokens" in err and "sliding window" in err
    ids = torch.tensor([tok.encode("to be")])
    ref, _ = _greedy_sliding_reference(model, ids, 40, 16)
    assert out == tok.decode(ref[0, ids.shape[1]:].tolist()) + "\n"


def test_cli_reads_a_hugging_face_folder(tmp_path, capsys):
    from forge.models.hf.convert import write_hf_folder
    from forge.models.io import unique_state_dict
    model, tok = _save_folder(tmp_path / "m")
    write_hf_folder(str(tmp_path / "hf"), model.cfg, unique_state_dict(model), src_dir=str(tmp_path / "m"))
    assert not (tmp_path / "hf" / "config.yaml").exists() and (tmp_path / "hf" / "config.json").exists()
    argv = ["--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0", "--ignore-eod"]
    code, out_forge, err = _cli(["--checkpoint", str(tmp_path / "m")] + argv, capsys)
    assert code == 0, err
    code, out_hf, err = _cli(["--checkpoint", str(tmp_path / "hf")] + argv, capsys)
    assert code == 0, err
    assert out_hf == out_forge and len(out_hf) > len("ROMEO:\n")


@pytest.mark.parametrize("flag,value,why", [
    ("--top-k", "0", "positive integer"), ("--top-k", "-3", "positive integer"), ("--top-k", "x", "not an integer"),
    ("--temperature", "nan", "finite"), ("--temperature", "inf", "finite"), ("--temperature", "-1", ">= 0"),
    ("--top-p", "0", "(0, 1]"), ("--top-p", "1.5", "(0, 1]"), ("--top-p", "nan", "(0, 1]"),
    ("--max-new-tokens", "0", "positive integer"), ("--max-new-tokens", "-5", "positive integer"),
    ("--seed", "-1", "[0, 2**63)"), ("--device", "nonsense", "not a torch device"),
])
def test_cli_refuses_bad_flags_by_name(tmp_path, capsys, flag, value, why):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and why in err and "Traceback" not in err


def test_cli_sampling_is_seeded_and_run_dir_works(tmp_path, capsys):
    run = _run_dir(tmp_path)
    argv = ["--checkpoint", str(run), "--prompt", "to be", "--max-new-tokens", "15", "--temperature", "1.0",
            "--top-k", "20", "--top-p", "0.95", "--seed", "3", "--ignore-eod"]
    a, b = _cli(argv, capsys), _cli(argv, capsys)
    assert a[0] == 0 and a[1] == b[1] and len(a[1]) > 1
    c = _cli(argv[:-2] + ["4", "--ignore-eod"], capsys)
    assert c[0] == 0


def test_cli_clear_errors(tmp_path, capsys):
    _save_folder(tmp_path / "m", max_seq_len=16)
    code, out, err = _cli(["--checkpoint", str(tmp_path / "m"), "--prompt", "héllo€"], capsys)
    assert code == 2 and "cannot encode" in err and "é" in err and "€" in err and "Traceback" not in err
    code, out, err = _cli(["--checkpoint", str(tmp_path / "m"), "--prompt", "a" * 17], capsys)
    assert code == 2 and "17 tokens" in err and "context of 16" in err
    code, out, err = _cli(["--checkpoint", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist" in err


def test_cli_interactive(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))          # the default history file: ~/.forge_history
    _save_folder(tmp_path / "m")
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nnot encodable: é\nsecond\n\n"))
    code, out, err = _cli(["--checkpoint", str(tmp_path / "m"), "--interactive", "--max-new-tokens", "5",
                           "--temperature", "0", "--ignore-eod"], capsys)
    assert code == 0
    assert "cannot encode" in err and "é" in err
    assert "> first" in out and "> second" in out         # (stdin is no terminal: the prompts are echoed alone)
    readline = pytest.importorskip("readline")
    history = tmp_path / ".forge_history"
    assert [line for line in history.read_text().splitlines() if not line.startswith("_HiStOrY")] == \
        ["first", "not encodable: é", "second"]
    # the next session starts from that history (arrow-up recalls it) and appends to it
    monkeypatch.setattr("sys.stdin", io.StringIO("third\n"))
    assert _cli(["--checkpoint", str(tmp_path / "m"), "--interactive", "--max-new-tokens", "2",
                 "--temperature", "0"], capsys)[0] == 0
    assert [readline.get_history_item(i) for i in range(1, readline.get_current_history_length() + 1)] == \
        ["first", "not encodable: é", "second", "third"]
    # --history '' keeps none
    monkeypatch.setattr("sys.stdin", io.StringIO("fourth\n"))
    assert _cli(["--checkpoint", str(tmp_path / "m"), "--interactive", "--history", "", "--max-new-tokens", "2",
                 "--temperature", "0"], capsys)[0] == 0
    assert "fourth" not in history.read_text()


def test_cli_empty_prompt_starts_a_document(tmp_path, capsys):
    _save_folder(tmp_path / "m")
    code, out, err = _cli(["--checkpoint", str(tmp_path / "m"), "--max-new-tokens", "5", "--seed", "0",
                           "--ignore-eod"], capsys)
    assert code == 0 and len(out) >= 1
