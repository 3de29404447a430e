"""Ctrl-C / SIGTERM during training: the first asks for a clean stop, the second aborts."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from sparsemoe.train.signals import StopOnSignal


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_requests_a_stop_second_aborts_and_handlers_come_back(sig, capsys):
    trainer = SimpleNamespace(stop_requested=False)
    before = signal.getsignal(sig)
    with StopOnSignal(trainer):
        signal.raise_signal(sig)
        assert trainer.stop_requested
        assert "stopping after this step" in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(sig)
    assert signal.getsignal(sig) == before


def test_a_signal_before_the_trainer_exists_aborts():
    with StopOnSignal(announce=False) as stopper:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        stopper.attach(SimpleNamespace(stop_requested=False))
        signal.raise_signal(signal.SIGTERM)
        assert stopper.trainer.stop_requested
