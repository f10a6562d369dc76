"""Train a tiny transformers model with the Hugging Face ``Trainer`` and a tuneless optimizer.

    python examples/hf_trainer.py                      # Tuneless, the default (takes the loss)
    python examples/hf_trainer.py --optimizer prodigy  # any registry name: momo, sf_adamw, ...

A one-layer GPT-2 with random weights (nothing is downloaded) learns to continue counting
sequences (each token is the previous one plus one, modulo the vocabulary). What tuneless needs
from the Trainer is all in :class:`tuneless.integrations.transformers.TunelessTrainer`: the loss
reaches the optimizer (the Trainer calls ``optimizer.step()`` with no argument), each log gets the
learned step size ``effective_lr`` (``learning_rate`` is the multiplier, 1.0), and the lr
scheduler is ``constant``. It prints the step sizes it logged, one per step.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import tuneless
from tuneless.integrations.transformers import TunelessTrainer

VOCAB, LENGTH = 32, 16


class Counting(torch.utils.data.Dataset):
    """Sequences start, start+1, ... (mod VOCAB): the model learns to count."""

    def __init__(self, size: int, seed: int = 0) -> None:
        starts = torch.randint(0, VOCAB, (size, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (starts + torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run(optimizer_name: str = "tuneless", steps: int = 20, **training_args: object) -> tuple[list[dict], TunelessTrainer]:
    """Train for ``steps`` optimizer steps; returns the training logs that carry ``effective_lr``
    and the trainer (``training_args`` override the TrainingArguments below)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    optimizer = tuneless.create(optimizer_name, model.parameters())
    with tempfile.TemporaryDirectory() as out:
        settings = dict(
            output_dir=out, max_steps=steps, per_device_train_batch_size=16, logging_steps=1,
            lr_scheduler_type="constant",  # the multiplier stays 1.0: the optimizer learns the step size
            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
        settings.update(training_args)
        accumulate = int(settings.get("gradient_accumulation_steps", 1))
        trainer = TunelessTrainer(model=model, args=TrainingArguments(**settings),
                                  train_dataset=Counting(16 * steps * accumulate), optimizers=(optimizer, None))
        trainer.train()
    return [entry for entry in trainer.state.log_history if "effective_lr" in entry], trainer


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="tuneless", help="a tuneless registry name (default: tuneless)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    logs, _ = run(args.optimizer, args.steps)
    for entry in logs:
        print(f"step {entry['step']:3d}  loss {entry['loss']:.4f}  learning_rate (multiplier) "
              f"{entry['learning_rate']:g}  effective_lr {entry['effective_lr']:.4g}")
    return logs


if __name__ == "__main__":
    main()
