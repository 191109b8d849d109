"""Ctrl-C during training: finish the step, write a checkpoint, stop.

The handler only raises a flag; the Trainer passes it along with the step's sums over the
ranks, so every rank stops after the same step, and rank 0 writes the checkpoint.
"""

import signal

from tqdm import tqdm


class CtrlC:
    """Within ``with ctrl_c:`` a first Ctrl-C sets ``ctrl_c.pressed``; a second one raises
    KeyboardInterrupt at once. ``announce``: print what happens (on one rank only)."""

    def __init__(self, announce=True):
        self.announce = announce
        self.pressed = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        if self.announce:
            tqdm.write("Ctrl-C: finishing this step and writing a checkpoint (Ctrl-C again to abort)")
