"""`opd train --fsdp` on one GPU: the CLI itself, inside a process group of one rank.

    python -m torch.distributed.run --standalone --nproc_per_node 1 \
        deploy/gpu_check/fsdp_train.py train --fsdp --device cuda ...

The trainer joins a process group only when WORLD_SIZE > 1 (opd.client.train.distributed),
and refuses --fsdp outside one, so `torchrun --nproc_per_node 1 -m opd.client.cli train --fsdp`
stops with "fsdp: run under torchrun". On a one-GPU host that would leave FSDP2 untested. This
wrapper joins the group torchrun describes (nccl on CUDA, gloo on CPU; world size 1) before
handing the arguments to the `opd` command line, so the trainer sees an initialized group and
shards the student with FSDP2 over it: the same code path as on 8 GPUs, with one shard.
"""

from __future__ import annotations

import sys


def main() -> None:
    import torch
    import torch.distributed as dist

    args = sys.argv[1:]
    device = args[args.index("--device") + 1] if "--device" in args else "cpu"
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        from opd.client.cli import main as opd_main

        sys.argv = ["opd", *args]
        try:
            opd_main()
        except SystemExit as exc:  # typer exits; keep its status but leave the group first
            if exc.code not in (0, None):
                raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
