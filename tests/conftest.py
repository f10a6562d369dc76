"""Test-wide hygiene: every test starts and ends with torch's global settings as they were.

Some reference packages change global state (``mechanic_pytorch`` turns grad mode off
globally; parity tests set the default dtype), and one test's leak must not fail the next.
Small tensors run faster on one thread, and the suite shares 2 cores with its own
multi-process tests.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    grad_mode = torch.is_grad_enabled()
    dtype = torch.get_default_dtype()
    yield
    torch.set_grad_enabled(grad_mode)
    torch.set_default_dtype(dtype)
