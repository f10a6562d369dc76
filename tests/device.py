"""The device the device-aware tests run their models on: the CPU, unless the environment
variable ``TUNELESS_TEST_DEVICE`` names another (``cuda``), as in the one-off GPU check
(``benchmarks/gpu_check.sh``). Data is drawn on the CPU from seeded generators, then moved, so
a run on another device starts from the same numbers."""

from __future__ import annotations

import os

import torch

TEST_DEVICE = torch.device(os.environ.get("TUNELESS_TEST_DEVICE", "cpu"))
