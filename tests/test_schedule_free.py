"""Schedule-Free beyond the reference: the mode as state, checkpoints from either mode, the
evaluation point, BatchNorm statistics, the wrapper as an optimizer, and the fully
learning-rate-free combination (ScheduleFreeProdigy) trained without any lr.

Generic properties (foreach = loop, no host sync, bf16 dtype kept, frozen parameters, groups,
lr schedulers to 0) run for every row in ``tests/test_contract.py``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import schedulefree
import tuneless
from tests.test_contract import Model, step
from tuneless import (LossRequiredError, Polyak, ScheduleFree, ScheduleFreeAdamW, ScheduleFreeProdigy, ScheduleFreeSGD,
                      WrongModeError, recompute_batchnorm_statistics)
from tuneless.optim.base import STEP_SIZE_KEY
from tuneless.problems import get_problem
from tuneless.run import run

KINDS = {
    "sgd": lambda ps: ScheduleFreeSGD(ps, lr=0.5, weight_decay=0.01),
    "adamw": lambda ps: ScheduleFreeAdamW(ps, lr=0.05, warmup_steps=2),
    "wrapper": lambda ps: ScheduleFree(torch.optim.SGD(ps, lr=0.1, momentum=0.5), weight_decay_at_y=0.01),
    "wrapper_adam": lambda ps: ScheduleFree(torch.optim.Adam(ps, lr=0.05)),
    "sf_prodigy": lambda ps: ScheduleFreeProdigy(ps, weight_decay=0.01),
}
ALL = pytest.mark.parametrize("kind", list(KINDS))


def snapshot(model: Model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.params]


def train(opt: torch.optim.Optimizer, model: Model, steps: int) -> None:
    for _ in range(steps):
        step(opt, model)


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y), what


def loss_at_x(opt, model: Model) -> float:
    with torch.no_grad(), opt.evaluation_point():
        return float(model.loss())


BF16_KINDS = {**KINDS, "sf_prodigy": lambda ps: ScheduleFreeProdigy(ps, d0=1e-4)}


def _bn_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 1)).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    target = torch.sin(x.sum(1, keepdim=True))
    opt = ScheduleFreeSGD(model.parameters(), lr=0.2)
    for t in range(10):
        rows = slice(16 * (t % 4), 16 * (t % 4) + 16)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rows]), target[rows]).backward()
        opt.step()
    return model, opt, x, target


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only spin (50 ms a step instead of 2 on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the mode


class TestScheduleFreeMode:
    """Train/eval mode as state: start, refusal, checkpoints, the evaluation point."""

    @ALL
    def test_starts_in_train_mode_and_steps_without_calling_train(self, kind) -> None:
        model = Model()
        opt = KINDS[kind](model.params)
        assert opt.training
        train(opt, model, 2)  # no train() call needed (the reference raises here)
        assert all(g["train_mode"] is True for g in opt.state_dict()["param_groups"])

    def test_the_reference_starts_in_eval_mode_and_refuses_to_step(self) -> None:
        """The difference from the reference that the test above covers."""
        p = torch.nn.Parameter(torch.ones(3))
        ref = schedulefree.SGDScheduleFree([p], lr=0.1)
        p.grad = torch.ones(3)
        with pytest.raises(Exception, match="not in train mode"):
            ref.step()

    @ALL
    def test_step_in_eval_mode_raises_a_dedicated_error_that_says_what_to_call(self, kind) -> None:
        model = Model()
        opt = KINDS[kind](model.params)
        train(opt, model, 3)
        opt.eval()
        assert not opt.training
        before = snapshot(model)
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        with pytest.raises(WrongModeError, match=r"in eval mode .*call optimizer\.train\(\) before training steps"):
            opt.step(loss=loss)
        assert issubclass(WrongModeError, RuntimeError)
        assert_equal(snapshot(model), before, "a refused step changed the parameters")
        opt.train()
        opt.step(loss=loss)  # fine again

    @ALL
    @pytest.mark.parametrize("mode", ["train", "eval"])
    def test_checkpoint_from_either_mode_resumes_exactly_and_restores_the_mode(self, kind, mode) -> None:
        k, n = 5, 5
        make = KINDS[kind]
        # uninterrupted run (with the same eval/train switch at the checkpoint)
        full = Model()
        opt = make(full.params)
        train(opt, full, k)
        if mode == "eval":
            opt.eval()
            opt.train()
        train(opt, full, n)
        # run, checkpoint (model + optimizer, saved in `mode`), resume in a fresh process-like setup
        model = Model()
        opt = make(model.params)
        train(opt, model, k)
        if mode == "eval":
            opt.eval()
        buffer = io.BytesIO()
        torch.save({"model": snapshot(model), "optim": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        assert all(g["train_mode"] is (mode == "train") for g in saved["optim"]["param_groups"])
        resumed = Model()
        with torch.no_grad():
            for p, s in zip(resumed.params, saved["model"]):
                p.copy_(s)
        opt2 = make(resumed.params)
        if mode == "train":
            opt2.eval()  # loading must switch it back to the saved mode
        opt2.load_state_dict(saved["optim"])
        assert opt2.training is (mode == "train"), "loading did not restore the saved mode"
        if mode == "eval":
            with pytest.raises(WrongModeError):
                step(opt2, resumed)
            opt2.train()
        train(opt2, resumed, n)
        assert_equal(snapshot(full), snapshot(resumed), f"{kind}: resuming from {mode} mode is not exact")

    def test_checkpoint_without_a_mode_loads_in_train_mode(self) -> None:
        model = Model()
        opt = ScheduleFreeSGD(model.params, lr=0.5)
        train(opt, model, 2)
        sd = opt.state_dict()
        for g in sd["param_groups"]:
            del g["train_mode"]
        opt2 = ScheduleFreeSGD(Model().params, lr=0.5)
        opt2.eval()
        opt2.load_state_dict(sd)
        assert opt2.training

    def test_a_group_added_in_eval_mode_joins_in_eval_mode(self) -> None:
        model = Model()
        opt = ScheduleFreeSGD([model.w, model.b], lr=0.5)
        train(opt, model, 2)
        opt.eval()
        opt.add_param_group({"params": [model.v]})
        assert opt.param_groups[-1]["train_mode"] is False
        opt.train()
        assert opt.training and all(g["train_mode"] for g in opt.param_groups)

    @ALL
    def test_evaluation_point_swaps_to_x_and_back(self, kind) -> None:
        model = Model()
        opt = KINDS[kind](model.params)
        train(opt, model, 6)
        y = snapshot(model)
        opt.eval()
        x = snapshot(model)
        opt.train()
        assert any(not torch.allclose(a, b, rtol=1e-6) for a, b in zip(x, y)), "x and y should differ"
        for a, b in zip(snapshot(model), y):  # the round trip is exact up to rounding
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        with opt.evaluation_point():
            assert not opt.training
            for a, b in zip(snapshot(model), x):
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        assert opt.training
        for a, b in zip(snapshot(model), y):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        # in eval mode already: nothing moves, and the mode stays
        opt.eval()
        before = snapshot(model)
        with opt.evaluation_point():
            assert_equal(snapshot(model), before, "evaluation_point moved the parameters in eval mode")
        assert not opt.training

    def test_the_race_reports_the_evaluation_point(self) -> None:
        """``tuneless.run.run`` evaluates through the hook: the final metrics are those at x."""
        spec, steps = "sf_sgd:lr=0.001", 30
        trace = run("rosenbrock", spec, steps=steps, dtype=torch.float64)
        instance = get_problem("rosenbrock").instantiate(0, dtype=torch.float64)
        opt = tuneless.create(spec, instance.params)
        for t in range(steps):
            opt.zero_grad()
            loss = instance.loss(t)
            loss.backward()
            opt.step(loss=loss)
        with opt.evaluation_point():
            at_x = instance.evaluate()
        at_y = instance.evaluate()
        assert trace.final == at_x
        assert at_x["loss"] != at_y["loss"]


# ----------------------------------------------------------------------------- BatchNorm


class TestScheduleFreeBatchNorm:
    """BatchNorm statistics recomputed at the evaluation point."""

    def test_recompute_batchnorm_statistics_at_the_evaluation_point(self) -> None:
        model, opt, x, target = _bn_setup()
        model.eval()
        y = [p.detach().clone() for p in model.parameters()]
        batches = [x[i:i + 16] for i in range(0, 64, 16)]
        assert recompute_batchnorm_statistics(model, batches, opt) == 4
        bn = model[1]
        with torch.no_grad(), opt.evaluation_point():
            h = model[0](x)
        expected_mean = torch.stack([h[i:i + 16].mean(0) for i in range(0, 64, 16)]).mean(0)
        expected_var = torch.stack([h[i:i + 16].var(0) for i in range(0, 64, 16)]).mean(0)
        torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-12, atol=1e-14)
        assert int(bn.num_batches_tracked) == 4
        with torch.no_grad():  # statistics at y would have been different
            assert not torch.allclose(model[0](x).mean(0), expected_mean, rtol=1e-6)
        # everything else is as it was: parameters at y, train mode, layer momentum, model flags
        assert opt.training and bn.momentum == 0.1 and not model.training and not bn.training
        for a, b in zip(model.parameters(), y):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)

    def test_recompute_batchnorm_statistics_options(self) -> None:
        model, opt, x, target = _bn_setup()
        pairs = [(x[i:i + 16], target[i:i + 16]) for i in range(0, 64, 16)]
        assert recompute_batchnorm_statistics(model, pairs, opt, num_batches=2) == 2  # (inputs, targets) pairs
        assert int(model[1].num_batches_tracked) == 2
        seen = []
        assert recompute_batchnorm_statistics(model, pairs, opt, forward=lambda m, b: seen.append(m(b[0]))) == 4
        assert len(seen) == 4
        # a model without BatchNorm: nothing to do, nothing run
        plain = torch.nn.Linear(4, 1)
        assert recompute_batchnorm_statistics(plain, pairs, None, forward=lambda m, b: 1 / 0) == 0


# ----------------------------------------------------------------------------- gradients, frozen, bf16, groups


class TestScheduleFreeParameters:
    """Gradients untouched, frozen parameters, bfloat16, param groups."""

    def test_gradient_is_never_modified_unlike_the_reference(self) -> None:
        g = torch.tensor([0.5, -2.0, 3.0])
        p = torch.nn.Parameter(torch.ones(3))
        ours = ScheduleFreeAdamW([p], weight_decay=0.1)
        p.grad = g.clone()
        ours.step()
        assert torch.equal(p.grad, g)
        q = torch.nn.Parameter(torch.ones(3))
        ref = schedulefree.AdamWScheduleFree([q], weight_decay=0.1)
        ref.train()
        q.grad = g.clone()
        ref.step()
        assert not torch.equal(q.grad, g)  # the reference normalizes p.grad in place

    @ALL
    def test_frozen_parameter_is_untouched_in_both_modes(self, kind) -> None:
        model = Model()
        frozen = torch.nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64))
        opt = KINDS[kind](model.params + [frozen])
        train(opt, model, 4)
        opt.eval()
        assert torch.equal(frozen, torch.full((3,), 2.0, dtype=torch.float64))
        opt.train()
        train(opt, model, 2)
        assert torch.equal(frozen, torch.full((3,), 2.0, dtype=torch.float64))
        assert frozen not in opt.state or not opt.state[frozen]

    @pytest.mark.parametrize("kind", list(BF16_KINDS))
    def test_bfloat16_parameters_train(self, kind) -> None:
        """(SF-Prodigy with d0 = 1e-4: with the default 1e-6 Prodigy's first steps are below bfloat16's
        resolution, the parameters never move and d never grows, with or without Schedule-Free.)"""
        model = Model(torch.bfloat16)
        opt = BF16_KINDS[kind](model.params)
        with torch.no_grad():
            start = float(model.loss().detach())
        train(opt, model, 30)
        assert loss_at_x(opt, model) < 0.7 * start
        for p in model.params:
            assert p.dtype == torch.bfloat16
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    assert value.dtype == torch.bfloat16

    @pytest.mark.parametrize("kind", ["sgd", "adamw", "wrapper", "wrapper_adam"])
    def test_param_groups_are_independent_with_their_own_lr(self, kind) -> None:
        """Two groups with different lrs = two optimizers, one per group (nothing shared)."""
        a, b = Model(), Model()
        together = KINDS[kind]([{"params": [a.w, a.b], "lr": 0.05}, {"params": [a.v], "lr": 0.01}])
        first = KINDS[kind]([{"params": [b.w, b.b], "lr": 0.05}])
        second = KINDS[kind]([{"params": [b.v], "lr": 0.01}])
        for _ in range(8):
            step(together, a)
            first.zero_grad(), second.zero_grad()
            loss = b.loss()
            loss.backward()
            first.step(loss=loss)
            second.step(loss=loss)
        for x, y in zip(snapshot(a), snapshot(b)):
            torch.testing.assert_close(x, y, rtol=1e-14, atol=0)
        with together.evaluation_point(), first.evaluation_point(), second.evaluation_point():
            for x, y in zip(snapshot(a), snapshot(b)):
                torch.testing.assert_close(x, y, rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- lr: schedulers and zero


class TestScheduleFreeLearningRate:
    """lr as the multiplier schedulers drive; lr = 0 freezes; published step sizes."""

    def test_lr_scheduler_warmup_equals_the_builtin_warmup(self) -> None:
        """The lr is the multiplier schedulers drive: LambdaLR warmup = warmup_steps, also for the wrapper."""
        warm = lambda e: min(1.0, (e + 1) / 5)  # noqa: E731
        m1, m2, m3 = Model(), Model(), Model()
        o1 = ScheduleFreeSGD(m1.params, lr=0.5, warmup_steps=5)
        o2 = ScheduleFreeSGD(m2.params, lr=0.5)
        o3 = ScheduleFree(torch.optim.SGD(m3.params, lr=0.5))
        s2 = torch.optim.lr_scheduler.LambdaLR(o2, warm)
        s3 = torch.optim.lr_scheduler.LambdaLR(o3, warm)
        for t in range(12):
            for o, m in ((o1, m1), (o2, m2), (o3, m3)):
                step(o, m)
            s2.step(), s3.step()
            assert float(o1.param_groups[0][STEP_SIZE_KEY]) == 0.5 * min(1.0, (t + 1) / 5)
        assert_equal(snapshot(m1), snapshot(m2), "scheduler warmup differs from warmup_steps")
        for x, y in zip(snapshot(m1), snapshot(m3)):  # the wrapper around SGD = Schedule-Free SGD
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)

    def test_lr_free_combination_lr_is_a_multiplier_for_schedulers(self) -> None:
        m1, m2 = Model(), Model()
        o1 = ScheduleFreeProdigy(m1.params, lr=0.5)
        o2 = ScheduleFreeProdigy(m2.params)
        sched = torch.optim.lr_scheduler.LambdaLR(o2, lambda e: 0.5)
        for _ in range(10):
            step(o1, m1)
            step(o2, m2)
            sched.step()
        assert_equal(snapshot(m1), snapshot(m2), "LambdaLR(0.5) differs from lr=0.5")

    @pytest.mark.parametrize("kind", ["sgd", "wrapper"])
    def test_lr_zero_freezes_a_group_mid_training_unlike_the_reference(self, kind) -> None:
        ours, ref_model = Model(), Model()
        opt = KINDS[kind](ours.params) if kind == "sgd" else ScheduleFree(torch.optim.SGD(ours.params, lr=0.5))
        ref = (schedulefree.SGDScheduleFree(ref_model.params, lr=0.5, weight_decay=0.01) if kind == "sgd"
               else schedulefree.ScheduleFreeWrapper(torch.optim.SGD(ref_model.params, lr=0.5)))
        ref.train()
        train(opt, ours, 4)
        train(ref, ref_model, 4)
        for o in (opt, ref):
            for g in o.param_groups:
                g["lr"] = 0.0
        key = "z" if kind == "sgd" else "sf_z"
        y, y_ref = snapshot(ours), snapshot(ref_model)
        z = [opt.state[p][key].clone() for p in ours.params]
        train(opt, ours, 3)
        train(ref, ref_model, 3)
        # y and z exactly as they were, hence x = (y - (1 - beta) z) / beta too
        assert_equal(snapshot(ours), y, "lr = 0 moved y")
        assert_equal([opt.state[p][key] for p in ours.params], z, "lr = 0 moved z")
        assert any(not torch.equal(a, b) for a, b in zip(snapshot(ref_model), y_ref)), "the reference moves at lr = 0"
        for g in opt.param_groups:
            g["lr"] = 0.5
        train(opt, ours, 1)
        assert any(not torch.equal(a, b) for a, b in zip(snapshot(ours), y))

    def test_step_sizes_are_published(self) -> None:
        model = Model()
        opt = ScheduleFreeProdigy(model.params)
        sizes = []
        for _ in range(30):
            step(opt, model)
            g = opt.param_groups[0]
            sizes.append(float(g[STEP_SIZE_KEY]))
        assert sizes[0] == pytest.approx(1e-6)  # Prodigy's d0 * lr
        assert sizes[-1] > 100 * sizes[0]  # the learned d grew
        wrapped = ScheduleFree(torch.optim.SGD([{"params": [model.w]}, {"params": [model.v], "lr": 0.0}], lr=0.1))
        step(wrapped, model)
        assert [float(g[STEP_SIZE_KEY]) for g in wrapped.param_groups] == [pytest.approx(0.1), 0.0]


# ----------------------------------------------------------------------------- the wrapper


class TestScheduleFreeWrapper:
    """The wrapper around any optimizer instance."""

    def test_wrapper_is_a_torch_optimizer_sharing_the_base_groups(self) -> None:
        model = Model()
        base = torch.optim.SGD([model.w, model.b], lr=0.1, momentum=0.5)
        opt = ScheduleFree(base, momentum=0.8)
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt.param_groups is base.param_groups
        opt.param_groups[0]["lr"] = 0.2
        assert base.param_groups[0]["lr"] == 0.2
        opt.add_param_group({"params": [model.v], "lr": 0.05})
        assert len(base.param_groups) == 2 and base.param_groups[1]["sf_momentum"] == 0.8
        train(opt, model, 2)
        sd = opt.state_dict()
        assert set(sd) == {"state", "param_groups"}
        assert {"sf_z", "momentum_buffer"} <= set(sd["state"][0])
        assert "sf_z" not in base.state[model.w]  # the wrapper's state is its own

    def test_wrapper_around_adam_equals_schedule_free_adamw_where_the_reference_breaks(self) -> None:
        """Adam with beta1 = 0 steps along g / (sqrt(v_hat) + eps), so the wrapper around it is SF-AdamW."""
        m1, m2 = Model(), Model()
        o1 = ScheduleFree(torch.optim.Adam(m1.params, lr=0.05, betas=(0.0, 0.999)), momentum=0.9, weight_decay_at_y=0.01)
        o2 = ScheduleFreeAdamW(m2.params, lr=0.05, betas=(0.9, 0.999), weight_decay=0.01)
        for _ in range(30):
            step(o1, m1)
            step(o2, m2)
        for x, y in zip(snapshot(m1), snapshot(m2)):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)
        p = torch.nn.Parameter(torch.ones(3))
        ref = schedulefree.ScheduleFreeWrapper(torch.optim.Adam([p], lr=0.1))
        ref.train()
        p.grad = torch.ones(3)
        with pytest.raises(KeyError):  # z in the base's state: Adam skips its own initialization
            ref.step()

    def test_wrapper_passes_the_loss_to_a_base_that_needs_it(self) -> None:
        model = Model()
        opt = ScheduleFree(Polyak(model.params))
        start = float(model.loss().detach())
        before = snapshot(model)
        model.loss().backward()
        with pytest.raises(LossRequiredError, match=r"step\(loss=loss\)"):
            opt.step()
        assert_equal(snapshot(model), before, "a refused step changed the parameters")
        assert len(opt.state) == 0 and opt.training
        train(opt, model, 20)
        assert loss_at_x(opt, model) < 0.5 * start

    @pytest.mark.parametrize("fused", [False, True], ids=["vectorized", "fused"])
    def test_wrapper_puts_y_back_when_the_base_raises(self, fused) -> None:
        class Failing(torch.optim.SGD):
            calls = 0

            def step(self, closure=None):
                Failing.calls += 1
                if Failing.calls == 3:
                    raise RuntimeError("base failed")
                return super().step(closure)

        model = Model()
        opt = ScheduleFree(Failing(model.params, lr=0.1), fused=fused)
        train(opt, model, 2)
        y = snapshot(model)
        z = [opt.state[p]["sf_z"].clone() for p in model.params]
        with pytest.raises(RuntimeError, match="base failed"):
            step(opt, model)
        for a, b in zip(snapshot(model), y):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        assert_equal([opt.state[p]["sf_z"] for p in model.params], z, "z changed")
        train(opt, model, 1)

    def test_wrapper_refuses_what_it_cannot_wrap(self) -> None:
        p = torch.nn.Parameter(torch.ones(2))
        with pytest.raises(TypeError, match=r"^ScheduleFree: base must be a torch.optim.Optimizer instance; got list$"):
            ScheduleFree([p])
        with pytest.raises(TypeError, match=r"^ScheduleFree: base ScheduleFreeSGD is already schedule-free"):
            ScheduleFree(ScheduleFreeSGD([p]))

    def test_registry_entries(self) -> None:
        p = [torch.nn.Parameter(torch.ones(2))]
        assert isinstance(tuneless.create("sf_prodigy", p), ScheduleFreeProdigy)
        assert tuneless.create("sf_adamw", p).param_groups[0]["lr"] == 0.0025
        assert tuneless.create("sf_sgd", p).param_groups[0]["lr"] == 1.0
        free = tuneless.learning_rate_free()
        assert "sf_prodigy" in free and "sf_sgd" not in free and "sf_adamw" not in free


# ----------------------------------------------------------------------------- no learning rate at all


class TestScheduleFreeProdigyWithoutLearningRate:
    """The fully learning-rate-free combination trains with no lr."""

    def test_lr_free_combination_wins_the_race_start_without_any_lr(self, one_thread) -> None:
        """Rosenbrock from (-1.2, 1): error 24.2 at the start; no lr given anywhere."""
        trace = run("rosenbrock", "sf_prodigy", steps=1500, dtype=torch.float64)
        assert trace.error is None and not trace.diverged
        start = float(trace.loss[0])
        assert start == pytest.approx(24.2)
        assert trace.final["error"] < 0.05 * start  # measured 0.72 (at x; 0.17 after 2000 steps, 0.25 after 5000)
        assert trace.step_size[0] == pytest.approx(1e-6) and trace.step_size[-1] > 1e-2  # d was learned

    def test_lr_free_combination_trains_logistic_regression_on_digits(self, one_thread) -> None:
        """Multinomial logistic regression on sklearn's bundled digits (1797 x 64), minibatches of 64."""
        from sklearn.datasets import load_digits

        features, labels = load_digits(return_X_y=True)
        x = torch.tensor(features / 16.0, dtype=torch.float32)
        y = torch.tensor(labels)
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 10)
        opt = ScheduleFreeProdigy(model.parameters())  # no lr
        with torch.no_grad():
            start = float(torch.nn.functional.cross_entropy(model(x), y))
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            rows = torch.randint(0, len(x), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad(), opt.evaluation_point():
            out = model(x)
            final = float(torch.nn.functional.cross_entropy(out, y))
            accuracy = float((out.argmax(1) == y).float().mean())
        assert start > 2.0 and math.isfinite(final)
        assert final < 0.1, final  # measured 0.035-0.043 over seeds
        assert accuracy > 0.97, accuracy  # measured 0.992


# ----------------------------------------------------------------------------- late in a run


LATE_PATHS = {"per-parameter": dict(foreach=False), "vectorized": dict(), "fused": dict(fused=True),
              "unchecked": dict(skip_nonfinite=False)}


@pytest.mark.parametrize("path", list(LATE_PATHS))
def test_the_average_stays_put_where_y_updates_round_away(path: str) -> None:
    """Late in a run c ~ 1/t makes y's update smaller than half of y's last bit: it rounds away
    while z keeps moving by lr g, and the implicit average x = (y - (1 - beta) z) / beta then
    drifts linearly (the 10^5-step run of ``tests/test_long_runs.py``: loss 3e-8 at step 10^4,
    3e-6 at 10^5). Here from the state such a run reaches (step 10^4, y and z a few last bits
    from the minimum of a realizable float32 least squares), 3000 more steps: the reference's
    arithmetic drifts from 1e-12 to 2.7e-9; with the rounding error fed back into z the loss at
    x stays at the float32 floor, on every path."""
    from tests.test_long_runs import LeastSquares

    def late_run(make) -> tuple[float, float]:
        problem = LeastSquares()
        with torch.no_grad():  # a few last bits from the minimum, as after 10^4 steps
            problem.w.copy_(torch.tensor([1.0, -2.0 - 4.76837158203125e-07, 0.5 + 5.960464477539063e-08]))
        start = problem.full_loss()
        opt = make([problem.w])
        for group in opt.param_groups:  # the schedule as after 10^4 steps at lr 0.1
            tensor = isinstance(group["k"], torch.Tensor)
            for key, value in (("k", 10_000), ("weight_sum", 10_000 * 0.1**2), ("lr_max", 0.1)):
                group[key] = torch.tensor(value, dtype=group[key].dtype) if tensor else value
        for i in range(3000):
            opt.zero_grad(set_to_none=False)
            problem.set_grad(i)
            opt.step()
        if isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "evaluation_point"):
            with opt.evaluation_point():
                return start, problem.full_loss()
        opt.eval()
        return start, problem.full_loss()

    def reference(params):
        opt = schedulefree.SGDScheduleFree(params, lr=0.1)
        opt.train()
        return opt

    start, drifted = late_run(reference)
    assert drifted > 1000 * start, "the reference no longer drifts: this test shows nothing"
    start, ours = late_run(lambda params: ScheduleFreeSGD(params, lr=0.1, **LATE_PATHS[path]))
    assert ours <= max(start, 1e-12), f"{path}: loss at x {start:.3e} -> {ours:.3e} in 3000 late steps"
