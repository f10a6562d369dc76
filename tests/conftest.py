"""Test-wide hygiene: every test starts and ends with torch's global settings as they were.

Some reference packages change global state (``mechanic_pytorch`` turns grad mode off
globally; parity tests set the default dtype), and one test's leak must not fail the next.
Small tensors run faster on one thread, and the suite shares 2 cores with its own
multi-process tests.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tuneless.distributed as td

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    grad_mode = torch.is_grad_enabled()
    dtype = torch.get_default_dtype()
    yield
    torch.set_grad_enabled(grad_mode)
    torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def _room_for_compiled_variants():
    """Every test starts with room in the fused kernels' tables of compiled variants.

    The kernels are module-level objects, so their tables fill across every test a worker
    process runs, this file's and others' (pytest-xdist's ``--dist loadfile`` gives a worker
    several files): a CI run hit the limit of 16 variants in a bfloat16 test of
    tests/test_fused.py, which then fell back to the uncompiled path. A table more than half
    full is emptied before the test (its variants compile again where needed, from torch's
    on-disk cache), and its limit warning is allowed again, so that a fallback warning in a
    test means that test's own kernel failed. Kernels that failed to compile are left as they
    are."""
    from tuneless.optim import _fused

    for kernel in _fused.KERNELS:
        if not kernel.failed and len(kernel._variants) >= _fused.MAX_VARIANTS // 2:
            kernel._variants.clear()
            kernel._warned = False
    limit_warnings = {w for w in _fused._WARNED_REASONS if w.startswith("more than ")}
    _fused._WARNED_REASONS.difference_update(limit_warnings)
    yield


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The losses loss-based steps take (every one passes through ``tuneless.distributed.average_loss``)."""
    seen: list[float] = []
    original = td.average_loss

    def spy(optimizer: Any, loss: torch.Tensor) -> torch.Tensor:
        seen.append(float(loss))
        return original(optimizer, loss)

    monkeypatch.setattr(td, "average_loss", spy)
    return seen
