"""Parity of tuneless.Prodigy with the authors' package, prodigyopt 1.1.2.

Same arguments, float64, a model with several tensors in two param groups of equal lr (the
reference refuses different ones), parameters compared after every step for 200 steps.

The model is multinomial logistic regression on linearly separable data, its weights split
over four tensors (one starting at 0, which the reference stores as a 0-d x0). It has no
finite minimum, so the iterates travel smoothly instead of hovering around a minimum, where
Adam-type steps amplify rounding differences chaotically (on a regression that converges,
perturbing the reference's own start by 1e-14 changes its parameters by up to 1e-7 within
200 steps, and some settings, e.g. betas=(0, 0.99) with d_coef=0.5, even diverge here after
180 steps, where no two implementations that round differently can agree to 1e-10). Each
configuration below was checked to stay stable over the 200 steps.

The weights start small (1e-3), which keeps the rounding of the first steps (where x - x0
is ~1e-6) small against the parameters.
"""

from __future__ import annotations

import pytest
import torch

prodigyopt = pytest.importorskip("prodigyopt", reason="test-only dependency prodigyopt==1.1.2")

from tuneless import Prodigy  # noqa: E402

STEPS = 200
RTOL = 1e-10
DT = torch.float64


class SeparableLogistic:
    """Cross-entropy of a linear 3-class classifier on separable data; features split in two blocks."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.wa = torch.nn.Parameter(1e-3 * torch.randn(3, 4, generator=g, dtype=DT))
        self.ba = torch.nn.Parameter(torch.zeros(3, dtype=DT))  # starts at 0: x0 stored as a 0-d tensor
        self.wb = torch.nn.Parameter(1e-3 * torch.randn(3, 5, generator=g, dtype=DT))
        self.bb = torch.nn.Parameter(1e-3 * torch.randn(3, generator=g, dtype=DT))
        self.x = torch.randn(48, 9, generator=g, dtype=DT)
        self.y = (self.x @ torch.randn(3, 9, generator=g, dtype=DT).T).argmax(1)  # separable

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.wa, self.ba, self.wb, self.bb]

    def groups(self, **group_kwargs) -> list[dict]:
        return [{"params": [self.wa, self.ba], **group_kwargs}, {"params": [self.wb, self.bb], **group_kwargs}]

    def loss(self) -> torch.Tensor:
        z = self.x[:, :4] @ self.wa.T + self.ba + self.x[:, 4:] @ self.wb.T + self.bb
        return torch.nn.functional.cross_entropy(z, self.y)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over one tensor (the norm-wise relative error)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


CONFIGS = {
    "default": {},
    "bias_correction": dict(use_bias_correction=True),
    "safeguard_warmup": dict(safeguard_warmup=True, lr=0.5),
    "safeguard_warmup+bias_correction": dict(safeguard_warmup=True, use_bias_correction=True),
    "growth_rate": dict(growth_rate=1.1),
    "d_coef": dict(d_coef=0.5),
    "coupled_weight_decay": dict(weight_decay=0.05, decouple=False),
    "decoupled_weight_decay": dict(weight_decay=0.01),
    "slice_p=3": dict(slice_p=3, lr=0.5),
    "beta1=0": dict(betas=(0.0, 0.999)),
    "lr=0.5,beta3,eps,d0": dict(lr=0.5, beta3=0.9, eps=1e-6, d0=1e-5),
}


#: The per-parameter path is checked against the vectorized one by the contract suite; here
#: it is also compared with the reference where its code differs (slices, no first moment, coupled decay).
CASES = [pytest.param(kw, True, id=f"{name}-foreach") for name, kw in CONFIGS.items()] + [
    pytest.param(CONFIGS[name], False, id=f"{name}-loop")
    for name in ("default", "slice_p=3", "beta1=0", "coupled_weight_decay")
]


@pytest.mark.parametrize("kwargs, foreach", CASES)
def test_matches_prodigyopt_step_by_step(kwargs, foreach) -> None:
    theirs_model, ours_model = SeparableLogistic(), SeparableLogistic()
    theirs = prodigyopt.Prodigy(theirs_model.groups(), **kwargs)
    ours = Prodigy(ours_model.groups(), foreach=foreach, **kwargs)
    for step in range(STEPS):
        for model, opt in ((theirs_model, theirs), (ours_model, ours)):
            opt.zero_grad(set_to_none=True)
            model.loss().backward()
            opt.step()
        for name, a, b in zip("wa ba wb bb".split(), ours_model.params, theirs_model.params):
            err = _close(a.detach(), b.detach())
            assert err <= RTOL, f"step {step}, {name}: relative difference {err:.2e}"
        d_theirs, d_ours = theirs.param_groups[0]["d"], float(ours.param_groups[0]["d"])
        assert abs(d_ours - d_theirs) <= RTOL * d_theirs, f"step {step}: d {d_ours} vs {d_theirs}"
    assert float(ours.param_groups[0]["d"]) > 100 * kwargs.get("d0", 1e-6), "d should have grown"


def test_matches_prodigyopt_with_weight_decay_per_group() -> None:
    """The reference already reads weight decay per group; so do we (with equal lrs)."""
    theirs_model, ours_model = SeparableLogistic(), SeparableLogistic()
    t_groups, o_groups = theirs_model.groups(), ours_model.groups()
    for groups in (t_groups, o_groups):
        groups[0]["weight_decay"] = 0.02
    theirs = prodigyopt.Prodigy(t_groups)
    ours = Prodigy(o_groups)
    for step in range(STEPS):
        for model, opt in ((theirs_model, theirs), (ours_model, ours)):
            opt.zero_grad(set_to_none=True)
            model.loss().backward()
            opt.step()
        for a, b in zip(ours_model.params, theirs_model.params):
            assert _close(a.detach(), b.detach()) <= RTOL, f"step {step}"


def test_matches_prodigyopt_when_a_tensor_skips_steps() -> None:
    """A tensor without gradient every third step: its moments are left as they were, as in the reference."""
    theirs_model, ours_model = SeparableLogistic(), SeparableLogistic()
    theirs = prodigyopt.Prodigy(theirs_model.groups())
    ours = Prodigy(ours_model.groups())
    for step in range(STEPS):
        for model, opt in ((theirs_model, theirs), (ours_model, ours)):
            opt.zero_grad(set_to_none=True)
            model.loss().backward()
            if step % 3 == 2:
                model.wb.grad = None
            opt.step()
        for a, b in zip(ours_model.params, theirs_model.params):
            assert _close(a.detach(), b.detach()) <= RTOL, f"step {step}"


@pytest.mark.parametrize("foreach, fused", [(False, False), (True, False), (True, True)], ids=["loop", "foreach", "fused"])
def test_matches_prodigyopt_with_a_0d_parameter(foreach, fused) -> None:
    """A 0-d parameter (a logit temperature) that does not start at 0: its x0 is its starting
    value, not the 0-d "started at 0" marker of the other tensors (that confusion once left d
    at d0 here)."""
    theirs_model, ours_model = SeparableLogistic(), SeparableLogistic()
    temps = [torch.nn.Parameter(torch.tensor(0.3, dtype=DT)) for _ in range(2)]
    losses = [lambda m=m, t=t: m.loss() * (1 + t) for m, t in zip((theirs_model, ours_model), temps)]
    theirs = prodigyopt.Prodigy([*theirs_model.groups(), {"params": [temps[0]]}])
    ours = Prodigy([*ours_model.groups(), {"params": [temps[1]]}], foreach=foreach, fused=fused)
    for step in range(STEPS):
        for loss, opt in zip(losses, (theirs, ours)):
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()
        for a, b in zip([*ours_model.params, temps[1]], [*theirs_model.params, temps[0]]):
            assert _close(a.detach(), b.detach()) <= RTOL, f"step {step}"
    assert float(ours.param_groups[0]["d"]) > 100 * 1e-6, "d should have grown"
