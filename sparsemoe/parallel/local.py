"""Run a function in W local processes joined by gloo on 127.0.0.1 (measurements, examples).

Each process gets `fn(rank, world_size, *args)` with the default process group initialised; the
return values come back in rank order. A process that fails or outlives `timeout_s` fails the whole
run with an error naming the rank, instead of leaving the caller waiting.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world: int, port: int, out_dir: str, threads: int, args: tuple) -> None:
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        result = (True, fn(rank, world, *args))
        dist.destroy_process_group()
    except BaseException:
        result = (False, traceback.format_exc())
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_local(fn: Callable[..., Any], world_size: int, *args, threads: int = 1, timeout_s: float = 300.0) -> list[Any]:
    """fn must be importable (a module-level function): the processes are started with 'spawn'."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, out_dir, threads, args), daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"local process {r} of {world_size} did not finish within {timeout_s:.0f} s")
            with open(path, "rb") as f:
                ok, value = pickle.load(f)
            if not ok:
                raise RuntimeError(f"local process {r} of {world_size} failed:\n{value}")
            results.append(value)
    return results
