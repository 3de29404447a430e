"""Graceful stop: the first Ctrl-C / SIGTERM finishes the current step, saves a checkpoint and stops."""

from __future__ import annotations

import signal
import threading
from typing import Any, Optional


class StopOnSignal:
    """First Ctrl-C/SIGTERM: ask the trainer to stop after this step (it then saves). A second one aborts.

    Use as a context manager around `trainer.fit()`; `attach(trainer)` may come later (before fit).
    The previous handlers come back on exit, so in-process callers (tests) keep theirs. Handlers can only
    be installed from the main thread; elsewhere this does nothing.
    """

    def __init__(self, trainer=None, announce: bool = True) -> None:
        self.trainer = trainer
        self.announce = announce
        self.previous: dict[int, Any] = {}

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def _handle(self, signum, frame) -> None:
        if self.trainer is None or self.trainer.stop_requested:
            raise KeyboardInterrupt
        self.trainer.stop_requested = True
        if self.announce:
            print("\nstopping after this step and saving a checkpoint (interrupt again to abort)", flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
