"""Train a small network on several processes with a learning-rate-free optimizer.

Run it with torchrun (CPU processes talk over gloo; with CUDA, one GPU per process over NCCL)::

    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py              # FSDP2
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --ddp        # DDP
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --optimizer polyak
    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --ddp --optimizer polyak --own-loss
    # several machines: the same command on each, with --nnodes N --node-rank i
    # --rdzv-backend c10d --rdzv-endpoint HOST:PORT instead of --standalone

What is particular to a learning-rate-free optimizer here, and nothing else is:

* Nothing to configure under FSDP2 (``fully_shard``): the optimizer finds from its DTensor
  parameters that they are sharded, and adds up its statistics (norms, dot products, distances)
  over the shard group, in one all-reduce a step. A method that takes its step size from the
  loss (Polyak, SPS, MoMo) also averages the ranks' losses, in one more all-reduce.
* Nothing to configure under DDP either: the gradients are already averaged, so gradient
  statistics agree on every rank without communication; only the loss differs from rank to
  rank, and a method that takes it averages it over the default process group by itself (one
  all-reduce of one number a step). ``--own-loss`` opts out with
  ``tuneless.distributed.set_loss_group(opt, None)``: for a loss that is already averaged, or
  ranks that train different models (here the replicas then drift apart; the log says by how much).
* ``--checkpoint DIR`` saves the model and the optimizer (its buffers and the learned scalars,
  such as DoG's distance or Prodigy's d, kept in the param groups) with
  ``torch.distributed.checkpoint`` at the end, and resumes from DIR when it holds one: stop,
  then rerun with a larger ``--steps`` to continue where it stopped.

CUDA/NCCL is the same code with another device and backend; it is untested here.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import tuneless
import tuneless.distributed as td

GLOBAL_BATCH = 64  # examples per step, over all ranks


class MLP(torch.nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, width), torch.nn.Linear(width, width)])
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)  # (batch, 1)


def global_batch(step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's examples, the same on every rank (each then takes its own slice)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 16, generator=g)
    teacher = torch.linspace(-1.0, 1.0, 16)
    y = torch.sin(3.0 * x @ teacher / 4.0) + 0.1 * x[:, 0]
    return x.to(device), y.unsqueeze(-1).to(device)  # targets of shape (batch, 1), like the output


def replica_drift(model: torch.nn.Module) -> float:
    """The largest difference between a DDP replica's weights and rank 0's (0 when they agree)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    first = flat.clone()
    dist.broadcast(first, src=0)
    drift = (flat - first).abs().max().reshape(1)
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    return float(drift)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="prodigy", help="a tuneless spec, e.g. prodigy, dog, polyak, cocob")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--ddp", action="store_true", help="DistributedDataParallel instead of FSDP2")
    parser.add_argument("--own-loss", action="store_true",
                        help="each rank's step size from its own loss (tuneless.distributed.set_loss_group(opt, None))")
    parser.add_argument("--checkpoint", default=None, help="a directory: resume from it, save to it at the end")
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    train(args, use_cuda)
    # The model, the optimizer and the collectives' handles they hold are freed (train returned)
    # while the interpreter is fully alive; then every rank waits for the others before the group
    # is torn down. Freed only at interpreter exit, gloo's tensors made a rank abort there now and
    # then ("terminate called without an active exception"; torch 2.13, CPU, FSDP2).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, use_cuda: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % world:
        raise SystemExit(f"{GLOBAL_BATCH} examples a step do not split over {world} processes")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    net = MLP().to(device)
    if args.ddp:
        model: torch.nn.Module = DDP(net, device_ids=[device.index] if use_cuda else None)
    else:
        mesh = init_device_mesh(device.type, (world,))
        for layer in net.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)  # the root too: every parameter the optimizer steps is a shard
        model = net
    opt = tuneless.create(args.optimizer, model.parameters())  # nothing else to set up, under DDP or FSDP2
    if args.own_loss:
        td.set_loss_group(opt, None)  # opt out of averaging the ranks' losses

    start = 0
    if args.checkpoint and os.path.exists(os.path.join(args.checkpoint, ".metadata")):
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd, "trainer": {"step": 0}}
        dcp.load(state, checkpoint_id=args.checkpoint)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = state["trainer"]["step"]
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start}", flush=True)

    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for step in range(start, args.steps):
        x, y = global_batch(step, device)
        loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
        loss.backward()
        opt.step(loss=loss.detach())  # loss= is used by Polyak-type methods and ignored by the others
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # for the log only
            drift = replica_drift(model) if args.ddp else 0.0
            if rank == 0:
                print(f"step {step:5d}  loss {float(mean) / world:.6f}  step size {opt.effective_lrs()[0]:.4g}"
                      + (f"  replica drift {drift:.3g}" if args.ddp else ""), flush=True)

    if args.checkpoint:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd, "trainer": {"step": args.steps}},
                 storage_writer=dcp.FileSystemWriter(args.checkpoint, overwrite=True))
        if rank == 0:
            print(f"saved {args.checkpoint} at step {args.steps}", flush=True)


if __name__ == "__main__":
    main()
