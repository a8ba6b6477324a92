"""
The processes of a `fastmtp distill` or `fastmtp train` job: one, or those that `accelerate launch` or `torchrun`
started, as accelerate's `PartialState` sees them.

A launcher can ask for several processes and leave each one alone, and then every process does all of the work
and writes the same files. Measured with accelerate 1.16 on a machine without a GPU:

- `accelerate launch --cpu --num_processes N` (and `--num_processes N` without `--multi_gpu`) runs the script in ONE
  process (its simple launcher expects `mpirun` to start the others). It sets `ACCELERATE_USE_CPU` and, for N > 1,
  `MASTER_ADDR` and `MASTER_PORT`, and no `WORLD_SIZE`.
- `accelerate launch --multi_gpu --num_processes N` and `torchrun --nproc_per_node N` start N processes with
  `RANK`, `LOCAL_RANK`, `WORLD_SIZE=N`. Without `ACCELERATE_USE_CPU=1` accelerate finds no GPU backend: it forms a
  process group but reports one process in each, so each does everything.

`launched_processes` refuses both. `ACCELERATE_USE_CPU=1` with either of the second pair gives N CPU processes
(gloo); on GPUs they work as they are (NCCL).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env

# Where each launcher puts the number of processes: torchrun and accelerate's torchrun-based launchers, then the
# MPI implementations that accelerate's own CPU setup reads (Intel MPI / MPICH, Open MPI, MVAPICH).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
CPU_COMMAND = "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m hf_fastmtp.cli ..."

T = TypeVar("T")


def launched_processes(*, cpu: bool = False, error: type[Exception] = RuntimeError) -> PartialState:
    """
    accelerate's state of this job's processes, refused with `error` when the launch asked for more processes than
    work together (see the module's docstring). `cpu` (or `ACCELERATE_USE_CPU=1`) joins them on the CPU, with gloo.
    Processes other than the main one log errors only, so that each warning is printed once.
    """
    state = PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_launch(state.num_processes, error)
    if not state.is_main_process:
        logging.getLogger("hf_fastmtp").setLevel(logging.ERROR)
    return state


def check_launch(
    num_processes: int, error: type[Exception] = RuntimeError, environ: Mapping[str, str] = os.environ
) -> None:
    """Raises `error` when the launch asked for other than the `num_processes` processes that form the job."""
    if num_processes == 1 and simple_launcher_asked_for_several(environ):
        raise error(
            f"The launcher asked for several processes (it set MASTER_ADDR={environ['MASTER_ADDR']}) but started "
            "only this one: `accelerate launch --cpu` (and `accelerate launch --num_processes N` without --multi_gpu) "
            f"starts one process unless mpirun starts the others. On CPUs, run `{CPU_COMMAND}` (or "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`); to run one process, "
            "unset MASTER_ADDR."
        )
    group_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    requested = requested_processes(environ, group_size)
    if requested is not None and requested != num_processes:
        raise error(
            f"The launcher started {requested} processes, but accelerate sees {num_processes} in this one (no GPU "
            "backend joined them): each would do all of the work and write the same files. On CPUs, set "
            f"ACCELERATE_USE_CPU=1: `{CPU_COMMAND}`; on GPUs, check that torch sees them (torch.cuda.is_available())."
        )


def requested_processes(environ: Mapping[str, str], group_size: int | None = None) -> int | None:
    """
    How many processes the launch started: the size of a process group that is already formed, else what the
    launcher's variables say; None when no launcher says.
    """
    if group_size is not None:
        return group_size
    for name in WORLD_SIZE_VARIABLES:
        if environ.get(name, "").strip():
            return int(environ[name])
    return None


def simple_launcher_asked_for_several(environ: Mapping[str, str]) -> bool:
    """
    accelerate's simple launcher (`--cpu`, or no `--multi_gpu`) always sets `ACCELERATE_USE_CPU`, and sets
    `MASTER_ADDR` only when asked for several processes or machines; under mpirun, a count comes with them.
    """
    has_count = any(environ.get(name, "").strip() for name in WORLD_SIZE_VARIABLES)
    return "ACCELERATE_USE_CPU" in environ and bool(environ.get("MASTER_ADDR")) and not has_count


def on_main_process(function: Callable[[], T]) -> T:
    """
    `function()` run by the main process alone (it owns the files that the processes share), its result handed to
    every process. Its exception is raised in every process, so that none is left waiting for the others.
    """
    state = PartialState()
    if state.num_processes == 1:
        return function()
    outcome: list = [None]
    if state.is_main_process:
        try:
            outcome = [(function(), None)]
        except Exception as raised:  # handed on, then raised here as well
            outcome = [(None, raised)]
    broadcast_object_list(outcome)
    result, raised = outcome[0]
    if raised is not None:
        raise raised
    return result


__all__ = [
    "check_launch",
    "launched_processes",
    "on_main_process",
    "requested_processes",
    "simple_launcher_asked_for_several",
]
