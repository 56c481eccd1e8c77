"""Several processes under torchrun: joining them, who this one is, and adding up over them.

Outside torchrun every function here gives the single-process answer, so the
stages call them unconditionally. One process per GPU (nccl) or per share of
the CPU's cores (gloo); rank 0 alone writes files.
"""
from __future__ import annotations

import os
import sys

import torch

from compress.cli import UserError, local_rank, resolve_device


def distributed() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless started by torchrun with several processes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device_name: str) -> torch.device:
    """Join the torchrun process group if there is one; returns this process's device."""
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"torchrun started {os.environ['LOCAL_WORLD_SIZE']} processes on this "
                            f"machine, which has {torch.cuda.device_count()} GPU(s); use "
                            f"--nproc_per_node={torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    else:  # share the cores between the processes instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if torch.distributed.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # one process reports; errors still reach stderr
    return device


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of numbers over all processes (a no-op in a single process)."""
    if distributed()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel under torchrun, else `model` itself."""
    if distributed()[1] == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def share_buffers_of_rank_0(model: torch.nn.Module) -> None:
    """BatchNorm statistics drift apart per process: give every process rank 0's."""
    if distributed()[1] > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
