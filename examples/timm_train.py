"""A timm model trained with a tuneless optimizer made by timm's own optimizer factory.

    python examples/timm_train.py                         # Tuneless ("tltuneless"), 20 steps
    python examples/timm_train.py --optimizer tlprodigy   # any name register() returns
    python examples/timm_train.py --model test_convnext --steps 40

``register()`` puts every tuneless method into timm's factory under a name timm can parse
("tl" + the registry name without underscores), so ``timm.optim.create_optimizer_v2`` (and
timm's train script, ``--opt tlprodigy --lr 1.0 --sched none``) builds it, with timm's param
groups (no weight decay on biases and norms). The data: scikit-learn's bundled 8x8 digits,
upsampled to 32x32 RGB (no download). Methods that take the loss get it from
``optimizer.step(loss=loss)``; in timm's own train script, which calls ``step()`` with no
argument, add ``optimizer.observe_loss(loss)`` after the backward pass. The learned step size
(``effective_lr``, not timm's ``lr`` multiplier) is printed as it is logged.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import timm
import timm.optim
from tuneless.integrations import step_sizes
from tuneless.integrations.timm import register


def digits(batch_size: int, seed: int = 0) -> torch.utils.data.DataLoader:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0   # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.target)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.contiguous(), y), batch_size=batch_size,
                                       shuffle=True, generator=torch.Generator().manual_seed(seed), drop_last=True)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="tltuneless", help="a name register() returns (default: tltuneless)")
    parser.add_argument("--model", default="test_vit", help="a timm model name (default: test_vit, timm's tiny ViT)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="timm's weight decay (0: none)")
    args = parser.parse_args(argv)

    names = register()
    if args.optimizer not in names:
        parser.error(f"--optimizer {args.optimizer!r} is not a registered tuneless name; one of: {', '.join(names)}")
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=32) \
        if "vit" in args.model else timm.create_model(args.model, pretrained=False, num_classes=10)
    optimizer = timm.optim.create_optimizer_v2(model, args.optimizer, lr=1.0, weight_decay=args.weight_decay)

    logged: list[dict[str, float]] = []
    model.train()
    step = 0
    while step < args.steps:
        for inputs, targets in digits(args.batch_size, seed=step):
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step(loss=loss.detach())  # timm's train.py: optimizer.observe_loss(loss); optimizer.step()
            step += 1
            logged.append({"step": step, "loss": float(loss), "lr": float(optimizer.param_groups[0]["lr"]),
                           **step_sizes(optimizer)})
            if step == args.steps:
                break
    for row in logged:
        sizes = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith("effective_lr"))
        print(f"step {row['step']:3d}  loss {row['loss']:.4f}  lr (multiplier) {row['lr']:g}  {sizes}")
    return logged


if __name__ == "__main__":
    main()
