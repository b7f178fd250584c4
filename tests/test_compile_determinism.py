"""train.compile=true on CPU is deterministic from run to run (so a resumed compiled run equals the
uninterrupted one): Inductor's embedding backward, atomic adds from several OpenMP threads, is
replaced by ATen's serial index_put_ under forge.train.engine.compile_determinism."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from forge.config import load_config
from forge.train.engine import compile_determinism


@pytest.mark.slow
def test_compiled_embedding_backward_is_the_same_every_time():
    n = torch.get_num_threads()
    torch.set_num_threads(2)                 # the race needs two threads adding into one row
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(8, 64, generator=g, requires_grad=True)
        idx = torch.randint(0, 8, (64, 256), generator=g)         # 16k lookups into 8 rows
        up = torch.randn(64, 256, 64, generator=g)                 # a different gradient for each lookup

        def loss(w, idx, up):
            return (F.embedding(idx, w) * up).sum()
        compiled = torch.compile(loss)
        cfg = load_config(None, ["train.compile=true"])
        digests = set()
        with compile_determinism(cfg):
            assert torch.are_deterministic_algorithms_enabled()
            for _ in range(30):
                w.grad = None
                compiled(w, idx, up).backward()
                digests.add(hashlib.sha256(w.grad.numpy().tobytes()).hexdigest())
        assert not torch.are_deterministic_algorithms_enabled()   # restored
        assert len(digests) == 1
        w.grad = None
        loss(w, idx, up).backward()                                 # and equal to eager (serial sums)
        assert digests == {hashlib.sha256(w.grad.numpy().tobytes()).hexdigest()}
    finally:
        torch.set_num_threads(n)
