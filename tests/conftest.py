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
