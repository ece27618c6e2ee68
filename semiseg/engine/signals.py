"""Stopping a run cleanly: SIGINT/SIGTERM become a request the training loop reads between steps.

The first SIGINT or SIGTERM sets :attr:`StopRequest.signum`; the loop finishes the current step
(or cuts the evaluation short), saves a checkpoint and returns. A second SIGINT quits at once,
without saving. ``stop_after=N`` in :meth:`semiseg.engine.trainer.Trainer.fit` is the same
request made by the caller (:meth:`StopRequest.request`).
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Optional


class StopRequest:
    """Whether, and by which signal, the run was asked to stop (``-1``: by the caller)."""

    def __init__(self, announce: bool = True):
        self.announce = announce  # rank 0 says on stderr what the first Ctrl-C does
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = -1) -> None:
        """Ask for a stop (keeps the first reason)."""
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if signum == signal.SIGINT and self.announce:
            sys.stderr.write("\nsemiseg: stopping: finishing this step and saving a checkpoint "
                             "(Ctrl-C again to quit at once, without saving)\n")

    @contextmanager
    def listening(self) -> Iterator["StopRequest"]:
        """SIGINT and SIGTERM set this request while inside; the old handlers come back after.
        Outside the main thread (where Python cannot install handlers) only :meth:`request` stops."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
