"""Graceful stop: the first Ctrl-C / SIGTERM finishes the current step, saves a checkpoint and stops.

Why the signals are also counted through a wakeup pipe: CPython runs a Python signal handler between
bytecodes, and a signal that arrives again before the handler ran (the main thread inside one long
matrix product, say) is merged with the first: the handler runs once for both. CPython's own C-level
handler writes one byte per delivered signal to the wakeup fd (`signal.set_wakeup_fd`), so the handler
counts the bytes: two signals are two, however close together, and the second aborts as it should.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """First Ctrl-C/SIGTERM: ask the trainer to stop after this step (it then saves). A second one aborts
    (KeyboardInterrupt), and so does a first one before the trainer exists (start-up: nothing to save).

    Use as a context manager around `trainer.fit()`; `attach(trainer)` may come later (before fit).
    The previous handlers (and wakeup fd) come back on exit, so in-process callers (tests) keep theirs.
    Handlers can only be installed from the main thread; elsewhere this does nothing.
    """

    def __init__(self, trainer=None, announce: bool = True) -> None:
        self.trainer = trainer
        self.announce = announce
        self.previous: dict[int, Any] = {}
        self.previous_wakeup: Optional[int] = None
        self.pipe: Optional[tuple[int, int]] = None

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def _delivered(self) -> int:
        """How many SIGINT/SIGTERM were delivered since the last call (at least the one being handled)."""
        count = 0
        if self.pipe is not None:
            try:
                while chunk := os.read(self.pipe[0], 64):
                    count += sum(byte in _SIGNALS for byte in chunk)
            except BlockingIOError:
                pass
        return max(count, 1)

    def _handle(self, signum, frame) -> None:
        delivered = self._delivered()
        if self.trainer is None or self.trainer.stop_requested or delivered > 1:
            raise KeyboardInterrupt
        self.trainer.stop_requested = True
        if self.announce:
            print("\nstopping after this step and saving a checkpoint (interrupt again to abort)", flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            self.pipe = (read, write)
            self.previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            for sig in _SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
        if self.pipe is not None:
            signal.set_wakeup_fd(self.previous_wakeup if self.previous_wakeup is not None else -1)
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None
