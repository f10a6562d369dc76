"""A training loop with Hugging Face Accelerate and a tuneless optimizer.

    python examples/accelerate_loop.py                                   # Tuneless, fp32
    python examples/accelerate_loop.py --optimizer momo --accumulate 2   # gradient accumulation
    python examples/accelerate_loop.py --mixed-precision bf16
    accelerate launch --num-processes 2 examples/accelerate_loop.py      # DDP: the ranks' losses are averaged

``AcceleratedOptimizer.step()`` passes no loss, so the one tuneless line is
``backward(accelerator, loss, optimizer)`` from :mod:`tuneless.integrations.accelerate`, in place
of ``accelerator.backward(loss)``: it also hands the loss to the optimizer's next step. The
learned step sizes go to Accelerate's trackers with ``accelerator.log`` (TensorBoard here, under a
temporary directory), read only at the steps that log; it prints them.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from accelerate import Accelerator

import tuneless
from tuneless.integrations import step_sizes
from tuneless.integrations.accelerate import backward


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="tuneless", help="a tuneless registry name (default: tuneless)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--log-every", type=int, default=1)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(32 * args.steps * args.accumulate, 8)
    y = torch.sin(x @ torch.linspace(-1, 1, 8)).unsqueeze(-1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = tuneless.create(args.optimizer, model.parameters())

    logged: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as out:
        accelerator = Accelerator(gradient_accumulation_steps=args.accumulate, mixed_precision=args.mixed_precision,
                                  log_with="tensorboard", project_dir=out)
        accelerator.init_trackers("run")
        model, optimizer, data = accelerator.prepare(model, optimizer, data)
        model.train()
        step = 0
        for inputs, targets in data:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(inputs).float(), targets)
                backward(accelerator, loss, optimizer)  # accelerator.backward(loss) + the loss channel
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:  # an optimizer step was taken
                step += 1
                if step % args.log_every == 0:
                    values = step_sizes(optimizer)  # read (and synced) only here
                    accelerator.log({"loss": loss.item(), **values}, step=step)
                    logged.append({"step": step, **values})
        accelerator.end_training()
    if accelerator.is_main_process:
        for row in logged:
            print(f"step {row['step']:3d}  effective_lr {row['effective_lr']:.4g}")
    return logged


if __name__ == "__main__":
    main()
