"""The loss channel (``observe_loss``) and ``tuneless.integrations``, with the examples run as written.

* The loss channel, on every loss-based row of the contract table (wrappers included): the
  same run as ``step(loss=...)``, bit for bit; used by exactly one step; dropped by
  ``zero_grad``; losses add up until the step; refused with a closure or ``loss=``, or from a
  closure inside the step; no host read; averaged over DDP ranks like ``step(loss=...)``.
* ``examples/hf_trainer.py`` (MoMo and Prodigy, 20 steps; gradient accumulation),
  ``examples/lightning.py`` (32-true, bf16-mixed, 16-mixed), ``examples/accelerate_loop.py``
  (fp32, accumulation, fp16 with Accelerate's GradScaler): each logs the learned step size,
  which changes over the steps, is not the multiplier 1.0, and is what the optimizer published.
* TensorBoard / W&B writing; timm: every method through timm's own factory, and
  ``examples/timm_train.py`` (tltuneless, tlprodigy), in a child process with a stand-in for
  torchvision (``tests/stubs/torchvision``), which cannot be installed next to the pinned torch.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import tuneless
from tests.optim_db import OPTIM_DB, OptimizerInfo
from tests.test_contract import Model, SyncCounter
from tuneless.errors import LossRequiredError

REPO = Path(__file__).resolve().parents[1]
LOSS_ROWS = [pytest.param(info, id=info.name) for info in OPTIM_DB if info.requires_loss]


def _example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Any:
    """Accelerate keeps its settings (mixed precision...) in process-wide singletons; the HF Trainer
    and the Accelerate tests each start from a fresh one."""
    def reset() -> None:
        if "accelerate" in sys.modules:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()

    reset()
    yield
    reset()


def _assert_learned(values: list[float], published: float) -> None:
    """The logged step sizes change, are not the multiplier 1.0 (MoMo's may sit at its cap, lr = 1.0,
    for the first steps: most are not), and the last is what the optimizer published."""
    assert len(set(values)) > 1, values
    assert all(v > 0 for v in values) and sum(v != 1.0 for v in values) > len(values) // 2, values
    assert values[-1] == pytest.approx(published, rel=1e-6)


# ----------------------------------------------------------------------------- the loss channel


def _channel_run(info: OptimizerInfo, steps: int, how: str) -> list[torch.Tensor]:
    model = Model()
    opt = info.build(model.params)
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        if how == "observe":
            opt.observe_loss(loss)
            opt.step()
        else:
            opt.step(loss=loss)
    return [p.detach().clone() for p in model.params]


@pytest.mark.parametrize("info", LOSS_ROWS)
def test_observed_loss_is_step_loss_and_used_once(info: OptimizerInfo) -> None:
    for a, b in zip(_channel_run(info, 4, "observe"), _channel_run(info, 4, "kwarg")):
        assert torch.equal(a, b)
    model = Model()
    opt = info.build(model.params)
    model.loss().backward()
    opt.observe_loss(model.loss())
    opt.step()
    with pytest.raises(LossRequiredError):  # the loss went with the step it was observed for
        opt.step()
    opt.observe_loss(model.loss())
    opt.zero_grad()  # drops it with the gradients
    model.loss().backward()
    with pytest.raises(LossRequiredError):
        opt.step()


@pytest.mark.parametrize("info", LOSS_ROWS)
def test_observed_losses_add_up_until_the_step(info: OptimizerInfo, received: list[float]) -> None:
    model = Model()
    opt = info.build(model.params)
    loss = float(model.loss().detach())
    for _ in range(2):  # two micro-batches, each half of the loss
        (model.loss() / 2).backward()
        opt.observe_loss(model.loss() / 2)
    opt.step()
    assert received == [pytest.approx(loss, rel=1e-12)]  # one loss for the step: the sum of the halves


def test_observed_sum_equals_the_loss() -> None:
    model = Model()
    opt = tuneless.Polyak(model.params)
    loss = model.loss()
    opt.observe_loss(loss / 3)
    opt.observe_loss(2 * loss / 3)
    pending = opt.__dict__["_tuneless_observed_loss"]
    assert torch.allclose(pending, loss.detach(), rtol=1e-12, atol=0)


def test_observed_loss_with_closure_or_loss_kwarg_is_refused() -> None:
    model = Model()
    opt = tuneless.Polyak(model.params)
    model.loss().backward()
    opt.observe_loss(model.loss())
    with pytest.raises(ValueError, match="observe_loss.*loss=: give the loss one way only"):
        opt.step(loss=model.loss())
    opt.observe_loss(model.loss())
    with pytest.raises(ValueError, match="a closure"):
        opt.step(model.loss)

    def closure() -> torch.Tensor:
        loss = model.loss()
        opt.observe_loss(loss)  # the closure's return value is the loss
        return loss

    with pytest.raises(RuntimeError, match="while step\\(\\) runs"):
        opt.step(closure)
    opt.step(loss=model.loss())  # the flag is cleared after the failed step


def test_observe_loss_refuses_non_scalars_and_is_not_saved() -> None:
    model = Model()
    opt = tuneless.Momo(model.params)
    with pytest.raises(ValueError, match="one element"):
        opt.observe_loss(torch.ones(2))
    with pytest.raises(TypeError, match="tensor or a number"):
        opt.observe_loss("1.0")
    opt.observe_loss(1.0)
    assert "_tuneless_observed_loss" not in str(opt.state_dict())


@pytest.mark.parametrize("info", LOSS_ROWS)
def test_observe_and_step_make_no_host_read(info: OptimizerInfo) -> None:
    model = Model()
    opt = info.build(model.params)
    for i in range(3):
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        with SyncCounter() if i else _Nothing() as counter:  # the first step may read while creating state
            opt.observe_loss(loss)
            opt.step()
        if i:
            assert counter.count == 0, counter.sites


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1, dtype=torch.float64)
    model = DDP(net)
    opt = tuneless.Polyak(net.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    rows = slice(8 * rank, 8 * rank + 8)
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[rows]).squeeze(-1), y[rows])
        loss.backward()
        opt.observe_loss(loss)  # this rank's loss: the optimizer averages the ranks'
        opt.step()
    torch.save([p.detach() for p in net.parameters()], Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_observed_loss_is_averaged_over_ddp_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1, dtype=torch.float64)
    opt = tuneless.Polyak(net.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    for _ in range(3):  # one process, the whole batch: its loss is the mean of the ranks'
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x).squeeze(-1), y)
        loss.backward()
        opt.step(loss=loss)
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), net.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- the base install


def test_integrations_import_no_framework() -> None:
    code = ("import sys, tuneless, tuneless.integrations; "
            "print(sorted(m for m in ('transformers', 'pytorch_lightning', 'lightning', 'accelerate', 'timm', "
            "'tensorboard', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- HF Trainer


@pytest.mark.parametrize("name", ["momo", "prodigy"])
def test_hf_trainer_example_logs_the_learned_step_size(name: str, received: list[float]) -> None:
    logs, trainer = _example("hf_trainer").run(name, steps=20)
    assert [entry["step"] for entry in logs] == list(range(1, 21))
    assert all(entry["learning_rate"] == 1.0 for entry in logs)  # the multiplier
    _assert_learned([entry["effective_lr"] for entry in logs],
                    float(trainer.optimizer.optimizer.param_groups[0]["effective_lr"]))
    assert [entry["skipped_steps"] for entry in logs] == [0.0] * 20  # the non-finite steps' count is logged
    if name == "momo":  # the loss of each step reached the optimizer: the one the Trainer logged
        assert received == pytest.approx([entry["loss"] for entry in logs], rel=1e-5)
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_hf_trainer_gradient_accumulation_passes_the_accumulated_loss(received: list[float]) -> None:
    logs, _ = _example("hf_trainer").run("momo", steps=4, gradient_accumulation_steps=2)
    assert len(received) == 4  # one loss a step, the sum of the two halves the Trainer logs as one
    assert received == pytest.approx([entry["loss"] for entry in logs], rel=1e-5)


def test_hf_trainer_warns_about_a_decaying_scheduler() -> None:
    example = _example("hf_trainer")
    with pytest.warns(UserWarning, match="lr_scheduler_type='linear'.*constant"):
        example.run("prodigy", steps=2, lr_scheduler_type="linear")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="TunelessTrainer")
        example.run("prodigy", steps=2, lr_scheduler_type="constant_with_warmup", warmup_steps=1)


def test_hf_trainer_saves_the_schedule_free_average(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, trainer = _example("hf_trainer").run("sf_adamw", steps=3)
    opt = trainer.optimizer.optimizer
    model = trainer.model
    y = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with opt.evaluation_point():
        x = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.save_model(str(tmp_path))
    saved = load_file(tmp_path / "model.safetensors")
    changed = [k for k in saved if not torch.equal(x[k], y[k])]
    assert changed  # the average differs from y after 3 steps
    for k in saved:
        assert torch.equal(saved[k], x[k]), k
    assert opt.training and all(torch.equal(v, y[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- Lightning


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_lightning_example_logs_the_learned_step_size(precision: str, received: list[float]) -> None:
    rows, trainer = _example("lightning").run("tuneless", precision, steps=20)
    assert trainer.precision_plugin.precision == precision
    logged = [row for row in rows if "effective_lr" in row]
    assert len(logged) == 20
    _assert_learned([row["effective_lr"] for row in logged], float(trainer.optimizers[0].param_groups[0]["effective_lr"]))
    assert all(row["skipped_steps"] == 0.0 for row in logged)  # the non-finite steps' count is logged
    # The optimizer got the unscaled training loss, once a step (16-mixed: through the loss
    # channel; otherwise from Lightning's closure).
    train_losses = [row["train_loss"] for row in rows if "train_loss" in row]
    assert len(train_losses) == 20 and len(received) >= 18  # 16-mixed: the scaler may skip a step
    it = iter(train_losses)  # the losses received are those of the steps taken, in order
    assert all(any(v == pytest.approx(t, rel=1e-6) for t in it) for v in received), (received, train_losses)


def test_lightning_refuses_accumulation_where_the_closure_gives_one_micro_batch() -> None:
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        _example("lightning").run("tuneless", "32-true", steps=2, accumulate_grad_batches=2)


def test_lightning_schedule_free_validates_at_the_average() -> None:
    rows, trainer = _example("lightning").run("sf_adamw", "32-true", steps=20)
    assert any("val_loss" in row for row in rows)  # validation ran (at step 10 and 20), in eval mode
    assert trainer.optimizers[0].training  # and training resumed in train mode


# ----------------------------------------------------------------------------- Accelerate


def test_accelerate_example_logs_the_learned_step_size() -> None:
    example = _example("accelerate_loop")
    logged = example.main(["--steps", "20"])
    assert [row["step"] for row in logged] == list(range(1, 21))
    assert len({row["effective_lr"] for row in logged}) > 1
    assert all(row["effective_lr"] != 1.0 for row in logged)


@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_accelerate_passes_the_accumulated_unscaled_loss(mixed_precision: str, received: list[float],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two micro-batches a step. Accelerate gives no GradScaler on the CPU (fp16 there is
    autocast only), so for "fp16" the scaler is put where Accelerate puts it on a GPU (the
    accelerator's ``scaler``, which ``backward`` multiplies by, and ``AcceleratedOptimizer``'s,
    whose ``step`` calls ``scaler.step(optimizer, closure)``)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    import tuneless.integrations.accelerate as tia

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = tuneless.create("tuneless", model.parameters())
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    if mixed_precision == "fp16":
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        model = accelerator.prepare(model)
        aopt = AcceleratedOptimizer(opt, device_placement=False, scaler=accelerator.scaler)
    else:
        model, aopt = accelerator.prepare(model, opt)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    halves = []
    for i in range(4):
        with accelerator.accumulate(model), torch.autocast("cpu", torch.float16, enabled=mixed_precision == "fp16"):
            loss = torch.nn.functional.mse_loss(model(x[2 * i: 2 * i + 2]).float(), y[2 * i: 2 * i + 2])
            tia.backward(accelerator, loss, aopt)
            halves.append(float(loss.detach()))
            aopt.step()
            aopt.zero_grad()
    want = [(halves[0] + halves[1]) / 2, (halves[2] + halves[3]) / 2]
    assert received == pytest.approx(want, rel=1e-6)
    assert not aopt.step_was_skipped


# ----------------------------------------------------------------------------- loggers, timm


def test_write_step_sizes_to_tensorboard_and_a_wandb_like_run(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from tuneless.integrations.loggers import write_step_sizes

    model = Model()
    opt = tuneless.Prodigy([{"params": model.params[:2]}, {"params": model.params[2:]}])
    writer = SummaryWriter(str(tmp_path))
    published = []
    for step in range(3):
        opt.zero_grad()
        model.loss().backward()
        if step == 2:  # a NaN gradient: the step is skipped, and the count is written
            model.params[0].grad.view(-1)[0] = float("nan")
        opt.step()
        written = write_step_sizes(writer, opt, step)
        published.append([float(g["effective_lr"]) for g in opt.param_groups])
        assert written == {"effective_lr/0": published[-1][0], "effective_lr/1": published[-1][1],
                           "skipped_steps": 1.0 if step == 2 else 0.0}
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    for group in range(2):
        got = [(e.step, e.value) for e in events.Scalars(f"effective_lr/{group}")]
        assert got == [(s, pytest.approx(published[s][group], rel=1e-6)) for s in range(3)]
    assert [(e.step, e.value) for e in events.Scalars("skipped_steps")] == [(0, 0.0), (1, 0.0), (2, 1.0)]

    class Run:  # the part of a W&B run that is used: log(dict, step=)
        def __init__(self) -> None:
            self.calls: list[tuple[dict, int]] = []

        def log(self, values: dict, step: int) -> None:
            self.calls.append((values, step))

    run = Run()
    write_step_sizes(run, opt, 7)
    assert run.calls == [({"effective_lr/0": published[-1][0], "effective_lr/1": published[-1][1],
                           "skipped_steps": 1.0}, 7)]
    with pytest.raises(TypeError, match="add_scalar"):
        write_step_sizes(object(), opt, 0)


def test_timm_names_survive_timms_name_parsing() -> None:
    """timm keeps what follows the last underscore of a name: every tuneless name has none."""
    from tuneless.integrations.timm import timm_name

    names = [timm_name(n) for n in tuneless.available(source="tuneless")]
    assert all("_" not in n and n == n.lower() and n.startswith("tl") for n in names)
    assert len(set(names)) == len(names)
    assert timm_name("sf_adamw") == "tlsfadamw"



# ----------------------------------------------------------------------------- timm
#
# timm 1.0.31 imports torchvision when it is imported, and torchvision cannot be installed next to
# the torch pinned here (see tests/stubs/torchvision): the timm tests run in a child process with
# that stand-in on its path when the real torchvision does not import. timm's optimizer factory
# and models, which these tests run, use nothing of torchvision.


def _timm_env() -> dict[str, str]:
    import os

    assert importlib.util.find_spec("timm") is not None, "timm is a test dependency (make env installs it)"
    env = dict(os.environ)
    paths = [str(REPO / "src"), str(REPO)]
    if subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode != 0:
        paths.insert(0, str(REPO / "tests" / "stubs"))
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run_timm(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_timm_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tltuneless", "tlprodigy"])
def test_timm_example_logs_the_learned_step_size(name: str) -> None:
    """examples/timm_train.py as written: a timm ViT built by timm, its optimizer by timm's
    factory from the registered name, 20 steps on the digits; the logged step size is the learned
    one (it changes, and it is not timm's lr multiplier 1.0), and the loss goes down."""
    out = _run_timm(f"""
import json, runpy, sys
sys.argv = ["timm_train.py", "--optimizer", "{name}", "--steps", "20"]
logged = runpy.run_path("examples/timm_train.py", run_name="example")["main"](sys.argv[1:])
print("LOGGED" + json.dumps(logged))
""")
    import json

    logged = json.loads(out.split("LOGGED", 1)[1])
    assert [row["step"] for row in logged] == list(range(1, 21))
    sizes = [row["effective_lr"] for row in logged]
    assert len(set(sizes)) > 1 and all(s != row["lr"] for s, row in zip(sizes, logged)), sizes
    assert all(row["lr"] == 1.0 for row in logged)
    first, last = sum(r["loss"] for r in logged[:5]) / 5, sum(r["loss"] for r in logged[-5:]) / 5
    assert last < 0.9 * first, (first, last)


def test_timm_register_builds_every_method_through_timms_factory() -> None:
    """register() puts every tuneless method into timm's default registry; create_optimizer_v2
    builds each from its name (with timm's weight decay where the method has one, refused with
    a clear error where it has not), and the plain name ``sf_adamw`` still resolves to timm's own
    AdamW (why the names carry the prefix and no underscore)."""
    out = _run_timm("""
import inspect, torch, timm, timm.optim, tuneless
from tuneless.integrations.timm import register, timm_name
names = register()
assert sorted(names) == sorted(timm_name(n) for n in tuneless.available(source="tuneless")), names
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
for registry_name in tuneless.available(source="tuneless"):
    cls = tuneless.registry.entry(registry_name).factory
    opt = timm.optim.create_optimizer_v2(model, timm_name(registry_name), lr=1.0)
    assert type(opt) is cls, (registry_name, type(opt))
    decays = "weight_decay" in inspect.signature(cls.__init__).parameters
    try:
        opt = timm.optim.create_optimizer_v2(model, timm_name(registry_name), lr=1.0, weight_decay=0.05)
        assert decays, registry_name + " accepted a weight decay it does not have"
        assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05], registry_name
    except ValueError as e:
        assert not decays and "weight_decay" in str(e), (registry_name, e)
    print("OK", registry_name)
assert type(timm.optim.create_optimizer_v2(model, "sf_adamw", lr=1e-3)).__name__ == "AdamW"
try:  # Mechanic has no lr: timm's 1.0 is dropped, another value refused with the valid arguments
    timm.optim.create_optimizer_v2(model, "tlmechanic", lr=0.5)
    raise SystemExit("tlmechanic took lr=0.5")
except tuneless.errors.UnknownArgumentError as e:
    assert "'lr'" in str(e) and "base" in str(e), e
""")
    assert out.count("OK ") == len(tuneless.available(source="tuneless")), out
