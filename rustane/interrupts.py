"""Ctrl-C and SIGTERM during training: finish the step, save, say how to resume.

A laptop shutdown, ``timeout`` and job schedulers send SIGTERM; a user presses Ctrl-C (SIGINT),
often twice. Both are handled the same way while ``Engine.fit`` runs:

1. the first signal asks the loop to stop at the next step boundary, where the state is
   consistent: the engine saves a checkpoint there, and a resume from it continues exactly;
2. a second signal, typically while that save runs, only prints that the save is under way
   (abandoning it would lose the run when ``--save-every`` is 0);
3. a third aborts at once (``KeyboardInterrupt``); the atomic save leaves no partial
   checkpoint (``rustane.checkpoint``), only the previous complete ones.

``Interrupted`` (a ``KeyboardInterrupt``, so scripts stop as they would on Ctrl-C) carries the
step and the checkpoint written.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

__all__ = ["Interrupted", "StopRequests", "SIGNALS"]

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)
ABORT_AFTER = 3  # signals: the third one aborts at once


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal after saving ``checkpoint`` (None: nowhere to save)."""

    def __init__(self, signame: str, step: int, checkpoint: Path | None):
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else "; nothing saved (no output folder)"
        super().__init__(f"{signame} after step {step}{where}")
        self.signame, self.step, self.checkpoint = signame, step, checkpoint


class StopRequests:
    """Signal handlers for the duration of a ``with`` block (main thread only; elsewhere the
    block runs without them, as Python delivers signals to the main thread only).

    ``requested`` turns true at the first SIGINT/SIGTERM; ``saving`` is set by the code that saves,
    so the second signal's message can say what it is waiting for.
    """

    def __init__(self, stream=None):
        self.count = 0
        self.signame: str | None = None
        self.saving = False
        self._stream = stream
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.count > 0

    def _say(self, msg: str) -> None:
        stream = self._stream or sys.stderr
        try:
            print(msg, file=stream, flush=True)
        except (OSError, ValueError, RuntimeError):
            # a closed terminal, or a print this signal interrupted (re-entrant write), must not
            # turn a clean stop into a crash
            pass

    def _handle(self, signum, frame) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            self.signame = name
            self._say(f"\n{name}: stopping after this step and saving a checkpoint "
                      f"(signal twice more to abort without saving)")
        elif self.count < ABORT_AFTER:
            what = "saving the checkpoint" if self.saving else "finishing the step, then saving"
            self._say(f"{name}: still {what}; signal once more to abort without it")
        else:
            self._say(f"{name}: aborting now")
            raise KeyboardInterrupt

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
