"""Timers, peak-memory measurement, copy bandwidth and a description of the machine.

Timings are interleaved (one call of each implementation per round) so that a burst of load from
elsewhere hits every implementation alike; the minimum over rounds is reported (the least disturbed
run) together with the median, and per call the page faults and system CPU time the kernel spent on
it. `time_alone` times one callable at a time instead, for the figure of a layer timed on its own.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover - Windows
    resource = None

import torch

from sparsemoe.ops import cpu_kernels

CLOCKS = {
    # wall time: what a user waits for; the number to quote on an otherwise idle machine.
    "wall": time.perf_counter,
    # CPU time of this process (all its threads): on a machine shared with other work it leaves out the
    # time this process waited for a core, so with --threads 1 it stays close to the idle-machine time.
    "cpu": time.process_time,
}


def check_names(what: str, names, known) -> None:
    """ValueError naming the first of `names` that is not in `known`, and what is accepted."""
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; accepted: {', '.join(known)}")


def _process_counters() -> tuple[int, float]:
    """(minor page faults, system CPU seconds) of this process so far; (0, 0.0) where unknown."""
    if resource is None:
        return 0, 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def _summary(samples: list[tuple[float, int, float]]) -> dict:
    """{"min_ms", "median_ms", "runs", "page_faults", "sys_ms"} of (ms, faults, sys ms) per call; the last two
    are medians: what the kernel did for the call (first touches of fresh memory, mostly)."""
    times = [t for t, _, _ in samples]
    return {
        "min_ms": min(times),
        "median_ms": statistics.median(times),
        "runs": len(times),
        "page_faults": statistics.median(f for _, f, _ in samples),
        "sys_ms": statistics.median(s for _, _, s in samples),
    }


def _timed_call(fn: Callable[[], None], now: Callable[[], float]) -> tuple[float, int, float]:
    faults, sys_s = _process_counters()
    start = now()
    fn()
    elapsed = now() - start
    faults_after, sys_after = _process_counters()
    return elapsed * 1e3, faults_after - faults, (sys_after - sys_s) * 1e3


def time_interleaved(
    fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1, clock: str = "wall",
    between: Optional[Callable[[], None]] = None,
) -> dict[str, dict]:
    """{name: {"min_ms", "median_ms", "runs", "page_faults", "sys_ms"}} for each callable, calls interleaved
    round by round; `between` (untimed) runs before every call, warmups included."""
    now = CLOCKS[clock]
    for fn in fns.values():
        for _ in range(warmup):
            if between is not None:
                between()
            fn()
    samples: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if between is not None:
                between()
            samples[name].append(_timed_call(fn, now))
    return {name: _summary(s) for name, s in samples.items()}


def time_alone(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1, clock: str = "wall") -> dict[str, dict]:
    """Like `time_interleaved`, but each callable's warmup and timed calls run back to back, with nothing else
    in between: the figure of a benchmark that times one thing at a time."""
    now = CLOCKS[clock]
    result = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        result[name] = _summary([_timed_call(fn, now) for _ in range(repeats)])
    return result


# What torch.profiler's C++ side (kineto, the CPU allocator) writes straight to the process's stderr on
# every start and stop: progress notes, not errors.
_PROFILER_NOISE = ("USDT:", "STAGE:", "SyncActivityProfilerHandler", "CPUAllocator.cpp")


@contextlib.contextmanager
def quiet_profiler_output() -> Iterator[None]:
    """Keep torch.profiler's own console lines (written by C++ to file descriptor 2) out of the user's
    console; anything else written to stderr meanwhile is passed on when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(mark in line for mark in _PROFILER_NOISE):
                    sys.stderr.write(line)


def peak_memory_bytes(fn: Callable[[], None], device: torch.device = torch.device("cpu")) -> int:
    """Peak of the bytes allocated by `fn` above what was allocated before it, on `device`.

    On a GPU: the caching allocator's own peak statistics. On the CPU: torch.profiler's allocation events,
    the one source that sees CPU allocations; each event carries a signed size, so the running sum is the
    live total and its maximum the peak.
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler_output(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def copy_bandwidth(device: torch.device = torch.device("cpu"), nbytes: int = 0, repeats: int = 5) -> float:
    """Copy bandwidth of `device`'s memory in bytes/s, STREAM convention: (bytes read + bytes written) /
    time, best of `repeats`.

    The buffers (default 256 MiB on the CPU, 1 GiB on a GPU) are much larger than the caches, so that
    the number is the memory's, not a cache's.
    """
    nbytes = nbytes or (2**30 if device.type == "cuda" else 256 * 2**20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What a reader needs to interpret the numbers: versions, threads, device."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_kernels": "native" if cpu_kernels.available() else "off (PyTorch/BLAS paths)",
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
