"""Train a small network with Lightning and a tuneless optimizer.

    python examples/lightning.py                                  # Tuneless, 32-bit
    python examples/lightning.py --precision 16-mixed             # fp16 autocast + GradScaler
    python examples/lightning.py --precision bf16-mixed --optimizer sf_adamw

The one tuneless piece is :class:`tuneless.integrations.lightning.TunelessCallback`: in 16-mixed
precision it hands the (unscaled) loss to the optimizer, which Lightning's ``scaler.step(opt)``
does not pass; it switches Schedule-Free methods to eval mode for validation and checkpoints;
and it writes every group's learned step size ``effective_lr`` to the Trainer's loggers (here a
CSV file, read back and printed).

On a machine without CUDA, Lightning turns ``precision="16-mixed"`` into ``"bf16-mixed"``
("AMP with fp16 is not supported on CPU"); to run the real 16-mixed path (fp16 autocast and a
``GradScaler`` calling ``optimizer.step()`` with no argument) this example passes Lightning's
``MixedPrecision("16-mixed", "cpu")`` plugin explicitly there.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision

import tuneless
from tuneless.integrations.lightning import TunelessCallback


class Regression(pl.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1).float(), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x).squeeze(-1).float(), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return tuneless.create(self.optimizer_name, self.parameters())


def data(n: int, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x @ torch.linspace(-1, 1, 8))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def run(optimizer_name: str = "tuneless", precision: str = "32-true", steps: int = 20,
        **trainer_args: object) -> tuple[list[dict[str, float]], pl.Trainer]:
    """Train for ``steps`` steps; returns the rows of the CSV log and the trainer."""
    pl.seed_everything(0, verbose=False)
    settings: dict = dict(precision=precision)
    if precision == "16-mixed" and not torch.cuda.is_available():
        settings = dict(plugins=[MixedPrecision("16-mixed", device="cpu")])  # see the module docstring
    settings.update(trainer_args)
    with tempfile.TemporaryDirectory() as out:
        trainer = pl.Trainer(
            max_steps=steps, accelerator="cpu", devices=1, log_every_n_steps=1, val_check_interval=10,
            limit_val_batches=2, num_sanity_val_steps=0, callbacks=[TunelessCallback()],
            logger=CSVLogger(out, name="run"), enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, **settings)
        trainer.fit(Regression(optimizer_name), data(32 * steps, 0), data(64, 1))
        with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
            rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return rows, trainer


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="tuneless", help="a tuneless registry name (default: tuneless)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    rows, trainer = run(args.optimizer, args.precision, args.steps)
    logged = [row for row in rows if "effective_lr" in row]
    print(f"precision: {type(trainer.precision_plugin).__name__} {trainer.precision_plugin.precision}")
    for row in logged:
        print(f"step {int(row['step']):3d}  effective_lr {row['effective_lr']:.4g}")
    return logged


if __name__ == "__main__":
    main()
