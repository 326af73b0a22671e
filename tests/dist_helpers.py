"""Run a test function under N gloo ranks (default 2) in spawned processes.

`run_distributed(fn, *args)` starts one process per rank with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT set as a launcher would (a free local port per call), calls `fn(rank, *args)` in each, and returns
when all have finished. A worker's exception fails the calling test with that worker's traceback; a run that
exceeds `timeout` seconds is killed and fails too. `fn` must be a module-level function (it is pickled).
Workers use one intra-op thread each: CI machines have two cores for two ranks.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    finally:
        from dnascale.parallel import destroy

        destroy()


def run_distributed(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 300.0) -> None:
    context = mp.start_processes(
        _worker, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    # join() raises ProcessRaisedException (with the worker's traceback) as soon as one rank fails, and
    # terminates the others, which may be blocked in a collective waiting for it.
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"distributed test {fn.__name__} did not finish within {timeout:.0f}s")
