"""The lm-evaluation-harness adapter (forge.lm_harness): its log-likelihoods against Forge's own
forward pass, generate_until against forge.generate, and `forge eval --tasks` through
lm_eval.simple_evaluate on local task YAMLs over a local JSONL dataset (no downloads)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import save_char_model

pytestmark = pytest.mark.usefixtures("one_thread")

CTX = 24


@pytest.fixture(scope="module")
def harness():
    """lm_eval imported (skipped when the [eval] extra is not installed)."""
    from forge.lm_harness import alias_renamed_transformers_classes, import_lm_eval
    alias_renamed_transformers_classes()                # lm_eval 0.4.9 under transformers 5
    pytest.importorskip("lm_eval")
    return import_lm_eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Forge model folder with a character tokenizer (context CTX tokens)."""
    root = tmp_path_factory.mktemp("lm_harness")
    model, tok = save_char_model(root / "model", root / "tok", CTX, std=0.15)
    return root / "model", model, tok


def _forge_logprob(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Forge's forward pass over the whole string: sum of log-softmax of the continuation tokens."""
    ctx = tok.encode(context) if context else [tok.eod_id]
    cont = tok.encode(continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]          # (T-1, V)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    target = torch.tensor(cont)
    return float(logp[pos, target].sum()), bool((logp[pos].argmax(-1) == target).all())


def _requests(kind, args_list):
    from lm_eval.api.instance import Instance
    return [Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


def test_loglikelihood_equals_forge_forward(harness, folder):
    from forge.lm_harness import make_forge_lm
    _, model, tok = folder
    lm = make_forge_lm(model, tok, batch_size=3)          # batches of unequal lengths: right padding
    pairs = [("To be, or not", " to be"), ("ROMEO:", " O"), ("", "hello there"),
             ("a", "b"), ("winter of our", " discontent"), ("abc  ", "def")]
    assert all(len(c + x) <= CTX + 1 for c, x in pairs)     # each fits the context (truncation: below)
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        if ctx.endswith(" "):                               # lm_eval moves trailing spaces to the continuation
            ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont
        ref, ref_greedy = _forge_logprob(model, tok, ctx, cont)
        assert abs(lp - ref) < 1e-6 and greedy == ref_greedy, (ctx, cont, lp, ref)
    # greedy is True exactly for the argmax continuation
    nxt = tok.decode([int(model(torch.tensor([tok.encode("ROMEO:")]))[0, -1].argmax())])
    assert lm.loglikelihood(_requests("loglikelihood", [("ROMEO:", nxt)]))[0][1] is True
    # a context longer than the model's: left-truncated to the last CTX tokens of the input
    long_ctx = "to be or not to be that is the question whether"
    lp, _ = lm.loglikelihood(_requests("loglikelihood", [(long_ctx, " tis")]))[0]
    ids = tok.encode(long_ctx + " tis")[-(CTX + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
    assert abs(lp - float(sum(logp[CTX - 4 + j, ids[CTX - 3 + j]] for j in range(4)))) < 1e-6


def test_loglikelihood_rolling(harness, folder):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from forge.lm_harness import make_forge_lm
    _, model, tok = folder
    lm = make_forge_lm(model, tok, batch_size=2)
    short, long = "a short line.", "Now is the winter of our discontent made glorious summer by this sun of York"
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,)]))
    # fits the context: one forward pass after the end-of-document token
    assert abs(got[0] - _forge_logprob(model, tok, "", short)[0]) < 1e-6
    # longer: lm_eval's disjoint windows, each scored by a plain forward pass
    ref = 0.0
    for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(tok.encode(long), tok.eod_id, CTX, 1)):
        ids = torch.tensor([ctx + pred])
        with torch.no_grad():
            logp = F.log_softmax(model(ids[:, :-1][:, -CTX:]).double(), dim=-1)[0]
        ref += float(logp[-len(pred):].gather(-1, torch.tensor(pred)[:, None]).sum())
    assert len(tok.encode(long)) > 2 * CTX and abs(got[1] - ref) < 1e-6
    # and that is not the same as ignoring the context limit (the windows matter)
    assert abs(got[1] - _forge_logprob(model, tok, "", long[:CTX])[0]) > 1e-3


def test_generate_until(harness, folder):
    from forge.generate import generate
    from forge.lm_harness import make_forge_lm
    _, model, tok = folder
    lm = make_forge_lm(model, tok)
    ids = torch.tensor([tok.encode("ROMEO:")])
    full = tok.decode(generate(model, ids, 30, temperature=0)[0, ids.shape[1]:].tolist())
    stop = full[3]                                          # a character the greedy text reaches
    out = lm.generate_until(_requests("generate_until", [("ROMEO:", {"until": [stop], "max_gen_toks": 30}),
                                                         ("ROMEO:", {"until": [], "max_gen_toks": 7})]))
    assert out[0] == full.split(stop)[0] and out[1] == full[:7]


TASKS = {
    "forge_tiny_mc": """task: forge_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""",
    "forge_tiny_gen": """task: forge_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}
DOCS = [{"question": "To be, or not to", "choices": ["be", "go", "sing"], "label": 0},
        {"question": "ROMEO: O", "choices": ["Juliet", "night", "sun"], "label": 1},
        {"question": "Now is the winter of our", "choices": ["discontent", "spring"], "label": 0},
        {"question": "Friends, Romans,", "choices": ["countrymen", "cats", "dogs"], "label": 2}]


def test_forge_eval_tasks_through_simple_evaluate(harness, folder, tmp_path, capsys):
    """`forge eval MODEL --tasks` on local task YAMLs: the reported accuracy is the argmax over
    the choices of Forge's own log-likelihoods; exact_match is forge's greedy text."""
    from forge.evaluate import main
    from forge.generate import generate
    path, model, tok = folder
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, text in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(text.format(data=data))
    code = main([str(path), "--tasks", "forge_tiny_mc,forge_tiny_gen", "--include-path", str(tmp_path), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    res = json.loads(out.out)
    right, exact = 0, 0
    for d in DOCS:
        lps = [_forge_logprob(model, tok, d["question"], " " + c)[0] for c in d["choices"]]
        right += int(max(range(len(lps)), key=lps.__getitem__) == d["label"])
        ids = torch.tensor([tok.encode(d["question"])])
        text = tok.decode(generate(model, ids, 6, temperature=0, eos_id=tok.eod_id)[0, ids.shape[1]:].tolist())
        text = text.split(tok.decode([tok.eod_id]))[0].split(".")[0] if text else text
        exact += int(text.strip() == d["choices"][d["label"]])
    assert math.isclose(res["forge_tiny_mc"]["acc,none"], right / len(DOCS))
    assert math.isclose(res["forge_tiny_gen"]["exact_match,none"], exact / len(DOCS))
    # a task folder that is not there is refused by name
    assert main([str(path), "--tasks", "forge_tiny_mc", "--include-path", str(tmp_path / "nope")]) == 2
    assert "--include-path" in capsys.readouterr().err
