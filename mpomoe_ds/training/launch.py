"""Distributed start-up under any launcher: ``deepspeed``, ``torchrun``, ``mpirun``, SLURM, or one process.

Owns turning the launcher's environment into an initialised torch.distributed
world (gloo on CPU, the accelerator's backend elsewhere) and nothing else.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed under any launcher, or as a 1-process group."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _ranks_from_mpi_env()
    launched = any(v in os.environ for v in ("RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"))
    if not launched:  # a plain `python -m mpomoe_ds.cli.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    # DeepSpeed's MPI discovery ignores MASTER_PORT unless it is passed explicitly.
    port = int(os.environ.get("MASTER_PORT", 29500))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False, distributed_port=port)
    return dist.get_rank(), dist.get_world_size()


def _ranks_from_mpi_env() -> None:
    """Under mpirun with MASTER_ADDR given, take ranks from OpenMPI/MPICH variables.

    DeepSpeed's mpi4py discovery would otherwise replace MASTER_ADDR with rank
    0's first ``hostname -I`` address, which can be the wrong network card.
    Without MASTER_ADDR, discovery through mpi4py does the job.
    """
    if "RANK" in os.environ or "MASTER_ADDR" not in os.environ:
        return
    for rank, size, local in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                              ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")):
        if rank in os.environ and size in os.environ:
            os.environ.update(RANK=os.environ[rank], WORLD_SIZE=os.environ[size],
                              LOCAL_RANK=os.environ.get(local, "0"))
            os.environ.setdefault("MASTER_PORT", "29500")
            return


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
