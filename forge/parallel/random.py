"""Random streams for dropout under tensor parallelism.

Activations that every tensor-parallel rank holds in full (the residual stream, embeddings) must
see the same dropout mask on every rank of the group, so the default stream is seeded with
`seed + dp_rank` (equal across tp and pp). Activations that differ per rank (attention
probabilities of this rank's heads; under sequence parallelism, this rank's tokens) must see
independent masks: they draw from a second stream seeded with `seed + 2718 + tp_rank`, entered
with `tp_stream.fork(device)` (Megatron's model-parallel RNG tracker). With tp = 1 the fork is a
no-op and every draw comes from the default stream.
"""
from __future__ import annotations

import contextlib

import torch


class TPStream:
    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}      # device type -> generator state
        self.seed_value: int | None = None

    def seed(self, seed: int | None) -> None:
        """Start the stream at `seed` (None: off, draws use the default stream)."""
        self.seed_value, self.states = seed, {}

    def _get(self, device: torch.device) -> torch.Tensor:
        return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()

    def _set(self, device: torch.device, state: torch.Tensor) -> None:
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def fork(self, device: torch.device):
        if self.seed_value is None:
            yield
            return
        default = self._get(device)
        if device.type not in self.states:
            gen = torch.Generator(device=device).manual_seed(self.seed_value)
            self.states[device.type] = gen.get_state()
        self._set(device, self.states[device.type])
        try:
            yield
        finally:
            self.states[device.type] = self._get(device)
            self._set(device, default)

    def state_dict(self) -> dict:
        return {"seed": self.seed_value, "states": dict(self.states)}

    def load_state_dict(self, d: dict) -> None:
        self.seed_value, self.states = d["seed"], dict(d["states"])


tp_stream = TPStream()
