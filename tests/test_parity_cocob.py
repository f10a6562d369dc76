"""COCOB against the authors' package, parameterfree 0.0.1 (parameterfree.COCOB).

Same arguments, float64, a smooth two-layer model with four tensors in two param groups,
minibatch gradients, parameters compared after every one of 200 steps to relative 1e-10.
"""

from __future__ import annotations

import parameterfree
import pytest
import torch

from tuneless import COCOB

STEPS = 200


class Problem:
    """A small tanh network on a fixed stream of minibatches (float64)."""

    def __init__(self, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        n = 512
        self.x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        w = torch.randn(3, 6, generator=g, dtype=torch.float64)
        self.y = (self.x @ w.T + 0.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)).argmax(1)
        self.batches = [torch.randint(0, n, (16,), generator=g) for _ in range(STEPS)]

    @staticmethod
    def params() -> list[torch.nn.Parameter]:
        g = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(0.3 * torch.randn(8, 6, generator=g, dtype=torch.float64)),
                torch.nn.Parameter(0.1 * torch.randn(8, generator=g, dtype=torch.float64)),
                torch.nn.Parameter(0.3 * torch.randn(3, 8, generator=g, dtype=torch.float64)),
                torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]

    def loss(self, ps: list[torch.Tensor], t: int) -> torch.Tensor:
        i = self.batches[t]
        hidden = torch.tanh(self.x[i] @ ps[0].T + ps[1])
        return torch.nn.functional.cross_entropy(hidden @ ps[2].T + ps[3], self.y[i])


def _groups(ps, weight_decay):
    return [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": weight_decay}]


def assert_close_every_step(ours: list[list[torch.Tensor]], ref: list[torch.Tensor], t: int) -> None:
    """Relative 1e-10 elementwise (a cheap check, run after every step)."""
    for run in ours:
        for a, b in zip(run, ref):
            err = ((a - b).abs() - 1e-10 * b.abs()).max()
            assert err <= 1e-15, f"step {t}: |ours - reference| exceeds 1e-10 relative by {float(err):.3g}"


@pytest.mark.parametrize("kwargs", [dict(), dict(alpha=20.0, eps=1e-6, weight_decay=1e-3)])
def test_matches_parameterfree_cocob(kwargs) -> None:
    problem = Problem()
    vec_p, loop_p, ref_p = problem.params(), problem.params(), problem.params()
    wd = kwargs.get("weight_decay", 0.0)
    runs = [(vec_p, COCOB(_groups(vec_p, 2 * wd), foreach=True, **kwargs)),
            (loop_p, COCOB(_groups(loop_p, 2 * wd), foreach=False, **kwargs)),
            (ref_p, parameterfree.COCOB(_groups(ref_p, 2 * wd), **kwargs))]
    for t in range(STEPS):
        for ps, opt in runs:
            opt.zero_grad()
            problem.loss(ps, t).backward()
            opt.step()
        with torch.no_grad():
            assert_close_every_step([vec_p, loop_p], ref_p, t)
    # the run did something: the loss went down from its start
    assert problem.loss(vec_p, 0) < problem.loss(Problem.params(), 0)
