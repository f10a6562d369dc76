"""The workloads of issue #14: transformer_lm, resnet_digits, finetune_digits, mlp_digits_long, mlp_digits_smooth.

Each is registered with a one-line description, deterministic given the seed, lowers its loss
under Adam, and keeps its validation data apart from its training data; the BatchNorm
recalibration and the fine-tuning checkpoint cache are tested on their own.
"""

from __future__ import annotations

import copy
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tuneless.problems import PROBLEMS, available_problems, get_problem
from tuneless.problems import transformer_lm as lm
from tuneless.problems import vision
from tuneless.problems.learning import (LABEL_SMOOTHING, MLPDigits, _digit_images, _raw_dataset, _sklearn_dataset,
                                        _split)
from tuneless.run import run

NEW = ["transformer_lm", "resnet_digits", "finetune_digits", "mlp_digits_long", "mlp_digits_smooth"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as in the benchmark's workers (and no oversubscription on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    """A fresh fine-tuning cache for this module (the user's ~/.cache is never touched)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNELESS_CACHE_DIR", str(tmp_path_factory.mktemp("tuneless_cache")))
    yield
    mp.undo()


def train(instance, steps: int, lr: float = 1e-3) -> None:
    opt = torch.optim.Adam(instance.params, lr=lr)
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        instance.loss(t).backward()
        opt.step()


def evaluated(instance) -> dict[str, float]:
    instance.prepare_evaluation()
    return instance.evaluate()


# ---------------------------------------------------------------------------- every new problem


@pytest.mark.parametrize("name", NEW)
def test_registered_with_a_description(name):
    assert name in available_problems("learning")
    cls = PROBLEMS[name]
    assert cls.kind == "learning" and cls.target_metric == "test_loss"
    assert cls.description and "\n" not in cls.description
    assert f"``{name}``" in (sys.modules[cls.__module__].__doc__ or ""), "the module docstring lists it"


@pytest.mark.parametrize("name", NEW)
def test_deterministic_per_seed(name):
    problem = get_problem(name)
    a = run(problem, "adam:lr=1e-3", steps=6, seed=3, eval_points=2)
    b = run(problem, "adam:lr=1e-3", steps=6, seed=3, eval_points=2)
    c = run(problem, "adam:lr=1e-3", steps=6, seed=4, eval_points=2)
    assert a.error is None and not a.diverged
    np.testing.assert_array_equal(a.loss, b.loss)
    assert a.final == b.final
    assert not np.array_equal(a.loss, c.loss), "another seed must change the initialization or the batches"
    assert {"loss", "test_loss", "test_accuracy"} <= set(a.final)


@pytest.mark.parametrize("name, steps, lr", [("transformer_lm", 30, 3e-3), ("resnet_digits", 30, 3e-3),
                                             ("finetune_digits", 30, 1e-3), ("mlp_digits_long", 30, 1e-3),
                                             ("mlp_digits_smooth", 30, 1e-3)])
def test_adam_lowers_training_and_held_out_loss(name, steps, lr):
    instance = get_problem(name).instantiate(0)
    before = evaluated(instance)
    train(instance, steps, lr)
    after = evaluated(instance)
    assert after["loss"] < 0.9 * before["loss"]
    assert after["test_loss"] < 0.9 * before["test_loss"]


@pytest.mark.parametrize("name", NEW)
def test_dtype_is_honoured(name):
    instance = get_problem(name).instantiate(0, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in instance.params)
    loss = instance.loss(0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in instance.params)


# ---------------------------------------------------------------------------- transformer_lm


def test_lm_split_by_file_and_text_made_of_its_files():
    train_text, test_text, train_files, test_files = lm.stdlib_corpus()
    assert train_files and test_files and not set(train_files) & set(test_files)
    assert all(lm.is_validation_file(f) for f in test_files) and not any(map(lm.is_validation_file, train_files))
    assert not any(part in lm.EXCLUDED_DIRS for f in train_files + test_files for part in f.split("/")[:-1])
    assert 0.05 < len(test_text) / (len(train_text) + len(test_text)) < 0.3
    root = Path(sysconfig.get_paths()["stdlib"])
    for text, files in ((train_text, train_files), (test_text, test_files)):
        expected = b"\0".join((root / f).read_bytes()[:lm.FILE_BYTES] for f in files)
        assert bytes(text.numpy()) == expected, "each split is exactly its own files' bytes"


def test_lm_is_a_transformers_model_built_quietly_and_sized():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = lm.TransformerLM().model(0)
    assert not [w for w in caught if "transformers" in str(w.filename)], "transformers' warnings are quiet"
    assert type(small).__name__ == "LlamaForCausalLM" and small.config.vocab_size == 256
    medium = lm.TransformerLM(size="medium").model(0)
    assert sum(p.numel() for p in medium.parameters()) > 2 * sum(p.numel() for p in small.parameters())
    assert lm.TransformerLM(size="medium").default_steps == lm.LM_SIZES["medium"].steps
    assert get_problem("transformer_lm:size=medium").spec() == "transformer_lm:size=medium"
    with pytest.raises(ValueError, match="size = 'big' is invalid; allowed: one of 'small', 'medium'"):
        get_problem("transformer_lm:size=big")


def test_lm_batches_are_a_function_of_seed_and_step():
    a = lm.TransformerLM().instantiate(1)
    b = lm.TransformerLM().instantiate(1)
    assert torch.equal(a.batch(5), b.batch(5)) and not torch.equal(a.batch(5), a.batch(6))
    assert not torch.equal(a.batch(5), lm.TransformerLM().instantiate(2).batch(5))
    assert a.batch(0).shape == (a.batch_size, a.size.context + 1)


# ---------------------------------------------------------------------------- digits splits


def test_digit_problems_train_and_test_on_disjoint_samples():
    n = len(_raw_dataset("digits")[1])
    train_idx, test_idx = _split(n)
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    x, _ = _raw_dataset("digits")
    images = (x.reshape(-1, 1, 8, 8) / 16.0).float()
    resnet = get_problem("resnet_digits").instantiate(0)
    assert torch.equal(resnet.x_train, images[train_idx]) and torch.equal(resnet.x_test, images[test_idx])
    xtr, _, xte, _ = _sklearn_dataset("digits")
    for name in ("mlp_digits_long", "mlp_digits_smooth"):
        inst = get_problem(name).instantiate(0)
        assert torch.equal(inst.x_train, xtr.float()) and torch.equal(inst.x_test, xte.float())


def test_finetuning_classes_are_disjoint_from_pretraining_classes():
    assert not set(vision.PRETRAIN_RECIPE.classes) & set(vision.FINETUNE_CLASSES)
    x, y = _raw_dataset("digits")
    label_of = {}
    for image, label in zip((x.reshape(-1, 64) / 16.0).float(), y.tolist()):
        label_of.setdefault(image.numpy().tobytes(), set()).add(label)
    inst = get_problem("finetune_digits").instantiate(0)
    for images, labels in ((inst.x_train, inst.y_train), (inst.x_test, inst.y_test)):
        for image, label in zip(images.reshape(-1, 64), labels.tolist()):
            assert label_of[image.numpy().tobytes()] == {vision.FINETUNE_CLASSES[label]}
    _, _, xte, yte = _digit_images()
    assert len(inst.y_test) == int(torch.isin(yte, torch.tensor(vision.FINETUNE_CLASSES)).sum())
    # the pretraining data: the training split's images of classes 0-4 only
    xtr, ytr, _, _ = _digit_images()
    xp, yp = vision._classes_subset(xtr, ytr, vision.PRETRAIN_RECIPE.classes)
    assert len(yp) == int(torch.isin(ytr, torch.tensor(vision.PRETRAIN_RECIPE.classes)).sum())
    assert set(yp.tolist()) == set(range(5))


# ---------------------------------------------------------------------------- BatchNorm


def _stem_statistics(instance) -> tuple[torch.Tensor, torch.Tensor]:
    """What the stem's BatchNorm should hold at the current parameters: per-batch channel mean and
    unbiased variance of the stem convolution's output, averaged over the calibration batches."""
    conv = instance.model.stem[0]
    with torch.no_grad():
        outs = [conv(x).transpose(0, 1).flatten(1) for x in instance.calibration]
    return (torch.stack([o.mean(1) for o in outs]).mean(0),
            torch.stack([o.var(1, unbiased=True) for o in outs]).mean(0))


def test_batchnorm_recalibrated_at_the_current_parameters():
    instance = get_problem("resnet_digits").instantiate(0)
    train(instance, 5, 3e-3)
    bn = instance.model.stem[1]
    with torch.no_grad():
        instance.model.stem[0].weight.mul_(2.0)  # move the parameters: the old statistics no longer fit
    stale_mean = bn.running_mean.clone()
    instance.prepare_evaluation()
    mean, var = _stem_statistics(instance)
    assert not torch.allclose(bn.running_mean, stale_mean, rtol=0.1)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1, "the layer's momentum is restored"
    assert instance.model.training and all(m.training for m in instance.model.modules())


def test_batchnorm_evaluation_in_eval_mode_then_back_to_train_mode():
    instance = get_problem("resnet_digits").instantiate(0)
    train(instance, 3, 3e-3)
    instance.prepare_evaluation()
    modes = []
    hook = instance.model.stem[1].register_forward_pre_hook(lambda m, _: modes.append(m.training))
    stats = copy.deepcopy(instance.model.stem[1].state_dict())
    metrics = instance.evaluate()
    hook.remove()
    assert modes and not any(modes), "evaluation runs the BatchNorm layers in eval mode"
    assert instance.model.training and all(m.training for m in instance.model.modules())
    for key, value in instance.model.stem[1].state_dict().items():
        assert torch.equal(value, stats[key]), "evaluation leaves the statistics alone"
    with torch.no_grad():
        instance.model.eval()
        expected = F.cross_entropy(instance.model(instance.x_test), instance.y_test) + instance.regularizer()
        instance.model.train()
    assert metrics["test_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_resnet_sizes():
    small = get_problem("resnet_digits").instantiate(0)
    medium = get_problem("resnet_digits:size=medium").instantiate(0)
    assert sum(p.numel() for p in medium.params) > 2 * sum(p.numel() for p in small.params)
    assert get_problem("resnet_digits:size=medium").default_steps > get_problem("resnet_digits").default_steps


# ---------------------------------------------------------------------------- the fine-tuning cache


QUICK = vision.PretrainRecipe(steps=3)


class CountingTrainer:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, recipe):
        self.calls += 1
        return vision.pretrain(recipe)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELESS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_checkpoint_written_once_then_reused(cache):
    trainer = CountingTrainer()
    first = vision.pretrained_checkpoint(QUICK, train=trainer)
    path = vision.checkpoint_path(QUICK)
    assert trainer.calls == 1 and path.parent == cache and path.exists()
    assert [p.name for p in cache.iterdir()] == [path.name], "no temporary file is left behind"
    stamp = path.stat().st_mtime_ns
    second = vision.pretrained_checkpoint(QUICK, train=trainer)
    assert trainer.calls == 1 and path.stat().st_mtime_ns == stamp
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_checkpoint_keyed_by_recipe_and_torch_version(cache, monkeypatch):
    trainer = CountingTrainer()
    vision.pretrained_checkpoint(QUICK, train=trainer)
    other = vision.PretrainRecipe(steps=4)
    assert vision.checkpoint_path(other) != vision.checkpoint_path(QUICK)
    vision.pretrained_checkpoint(other, train=trainer)
    assert trainer.calls == 2
    before = vision.checkpoint_path(QUICK)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert vision.checkpoint_path(QUICK) != before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shapes"])
def test_corrupt_checkpoint_is_rebuilt(cache, damage):
    trainer = CountingTrainer()
    good = vision.pretrained_checkpoint(QUICK, train=trainer)
    path = vision.checkpoint_path(QUICK)
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        torch.save({k: torch.zeros(1) for k in good}, path)
    rebuilt = vision.pretrained_checkpoint(QUICK, train=trainer)
    assert trainer.calls == 2
    assert all(torch.equal(good[k], rebuilt[k]) for k in good), "the recipe is deterministic"
    again = torch.load(path, weights_only=True)
    assert all(torch.equal(good[k], again[k]) for k in good), "the rebuilt file replaced the corrupt one"


def test_finetuning_starts_from_the_checkpoint_with_a_seeded_head():
    state = vision.pretrained_checkpoint()  # the module's cache: pretrained once for all these tests
    a = get_problem("finetune_digits").instantiate(0).model
    b = get_problem("finetune_digits").instantiate(1).model
    for key, value in state.items():
        if not key.startswith("head."):
            assert torch.equal(a.state_dict()[key], value) and torch.equal(b.state_dict()[key], value)
    assert not torch.equal(a.head.weight, b.head.weight), "the new head comes from the run seed"
    assert not torch.equal(a.head.weight, state["head.weight"])
    assert vision.checkpoint_path().exists()


# ---------------------------------------------------------------------------- the two MLP variants


def test_long_run_is_mlp_digits_with_ten_times_the_budget():
    assert get_problem("mlp_digits_long").default_steps == 10 * MLPDigits.default_steps
    a = run("mlp_digits_long", "adam:lr=1e-3", steps=5, seed=2, eval_points=1)
    b = run("mlp_digits", "adam:lr=1e-3", steps=5, seed=2, eval_points=1)
    np.testing.assert_array_equal(a.loss, b.loss)


def test_label_smoothing_in_training_and_held_out_loss():
    instance = get_problem("mlp_digits_smooth").instantiate(0)
    train(instance, 60, 1e-2)
    metrics = instance.evaluate()
    with torch.no_grad():
        out = instance.model(instance.x_test)
        reg = float(instance.regularizer())
        smoothed = float(F.cross_entropy(out, instance.y_test, label_smoothing=LABEL_SMOOTHING)) + reg
        plain = float(F.cross_entropy(out, instance.y_test)) + reg
    assert metrics["test_loss"] == pytest.approx(smoothed, rel=1e-6) and smoothed != pytest.approx(plain, rel=1e-3)
    # the smoothed cross-entropy is at least the entropy of the smoothed target: 0.50 nats for 10 classes
    floor = -(0.91 * np.log(0.91) + 9 * 0.01 * np.log(0.01))
    assert metrics["loss"] > floor and metrics["test_loss"] > floor
    assert metrics["test_accuracy"] > 0.8
