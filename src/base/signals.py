"""Ctrl-C and SIGTERM: how a run learns that it must stop. Standard library only.

Two ways, each where it fits:
- around a whole run (`tracking.run`), SIGTERM raises KeyboardInterrupt like Ctrl-C, so the run
  closes KILLED (`catch_sigterm` / `restore_sigterm`);
- inside the training loop (`StopOnSignal`), either signal only sets a flag, and the loop stops at
  its next optimizer step after saving a checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_received: list[int] = []  # SIGTERMs received and not yet handled by a run's close


def _raise_interrupt(signum, frame):  # noqa: ARG001
    _received.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def catch_sigterm() -> Any:
    """SIGTERM raises KeyboardInterrupt from now on; returns the handler it replaced."""
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def restore_sigterm(previous: Any) -> None:
    signal.signal(signal.SIGTERM, previous)


def raise_if_interrupted() -> None:
    """Python prints and drops an exception raised while it runs a weakref callback or __del__, and a
    signal handler may run just then (seen after a blocking call): the signal is remembered, so the
    next check, at the latest the run's close, raises it again."""
    if _received:
        raise KeyboardInterrupt(f"signal {_received[-1]}")


def forget_interrupts() -> None:
    """The interrupt was handled (the run closed KILLED): later checks must not raise it again."""
    _received.clear()


class StopOnSignal:
    """Ctrl-C or SIGTERM asks the loop to stop at the next optimizer step, after a checkpoint;
    a second signal stops at once.

    A flag, not an exception raised from the handler: a KeyboardInterrupt raised while Python runs a
    weakref callback or __del__ is printed and dropped, and the signal would be lost."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        self.requested = True

    def stop_if_requested(self, note: str = "") -> None:
        """Called where stopping is safe: after the checkpoint, when there is one (`note` says so)."""
        if self.requested:
            raise KeyboardInterrupt(f"stopped by a signal{note}")

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
