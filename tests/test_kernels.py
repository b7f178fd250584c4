"""forge.kernels.linear: the oneDNN CPU path equals F.linear (values and gradients), is left out
under autocast / other dtypes, and the backend switch is scoped by the caller."""
import pytest
import torch
import torch.nn.functional as F

from forge import kernels
from forge.config import ModelConfig
from forge.models.transformer import build_model




pytestmark = [pytest.mark.skipif(not kernels.onednn_available(), reason="PyTorch built without oneDNN"),
              pytest.mark.usefixtures("one_thread")]   # tiny shapes: see conftest.one_thread


@pytest.fixture
def onednn():
    previous = kernels.get_linear_backend()
    kernels.set_linear_backend("onednn")
    yield
    kernels.set_linear_backend(previous)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24)])
def test_onednn_linear_matches_f_linear(onednn, shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    up = torch.randn(*shape[:-1], 40, generator=g)
    y = kernels.linear(x, w, b)
    grads = torch.autograd.grad((y * up).sum(), [t for t in (x, w, b) if t is not None])
    y_ref = F.linear(x, w, b)
    ref = torch.autograd.grad((y_ref * up).sum(), [t for t in (x, w, b) if t is not None])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-5)


def test_model_gradients_match_aten_backend():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qkv_bias=True,
                      mlp_bias=True, tie_embeddings=True, max_seq_len=32)
    model = build_model(cfg)
    ids = torch.randint(0, 61, (2, 17))

    def grads():
        model.zero_grad()
        loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    previous = kernels.get_linear_backend()
    try:
        kernels.set_linear_backend("aten")
        l0, g0 = grads()
        kernels.set_linear_backend("onednn")
        l1, g1 = grads()
    finally:
        kernels.set_linear_backend(previous)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-4, msg=name)


def test_falls_back_outside_fp32_cpu(onednn):
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.linear(x, w).dtype == torch.bfloat16      # autocast semantics kept
    assert kernels.linear(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16


def test_backend_names():
    previous = kernels.get_linear_backend()
    try:
        assert kernels.set_linear_backend("auto") == "onednn"
        with pytest.raises(ValueError, match="not one of"):
            kernels.set_linear_backend("mkl")
    finally:
        kernels.set_linear_backend(previous)


@pytest.mark.slow
def test_onednn_linear_under_torch_compile(onednn):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, max_seq_len=32))
    ids = torch.randint(0, 61, (2, 17))
    step = lambda: model.loss(model(ids[:, :-1]), ids[:, 1:])
    eager = step()
    eager.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(step)()
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-4, msg=n)
