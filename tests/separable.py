"""A small float64 model shared by the tests of the Adam-like anchors (MoMo-Adam, ScheduleFree+)."""

from __future__ import annotations

import torch

DT = torch.float64


class SeparableLogistic:
    """Cross-entropy of a linear 3-class classifier on separable data; three tensors (the features
    split in two weight blocks, and a bias), the weights drawn at ``scale``."""

    def __init__(self, scale: float = 1e-3) -> None:
        g = torch.Generator().manual_seed(0)
        self.wa = torch.nn.Parameter(scale * torch.randn(3, 4, generator=g, dtype=DT))
        self.wb = torch.nn.Parameter(scale * torch.randn(3, 5, generator=g, dtype=DT))
        self.b = torch.nn.Parameter(torch.zeros(3, dtype=DT))
        self.x = torch.randn(48, 9, generator=g, dtype=DT)
        self.y = (self.x @ torch.randn(3, 9, generator=g, dtype=DT).T).argmax(1)  # separable

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.wa, self.wb, self.b]

    def loss(self) -> torch.Tensor:
        z = self.x[:, :4] @ self.wa.T + self.x[:, 4:] @ self.wb.T + self.b
        return torch.nn.functional.cross_entropy(z, self.y)

    def backward(self) -> torch.Tensor:
        """Fresh gradients of the loss; returns the loss, detached."""
        for p in self.params:
            p.grad = None
        loss = self.loss()
        loss.backward()
        return loss.detach()
