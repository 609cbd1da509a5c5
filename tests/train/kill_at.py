"""Run `kmodel ...` and SIGKILL the process at a chosen point (test helper, started as a subprocess).

    python tests/train/kill_at.py step N  train ...   # dies as step N+1 begins (checkpoints up to N written)
    python tests/train/kill_at.py save NAME train ... # dies inside the save of checkpoint NAME, after its
                                                      # state.pt was written to the temporary directory
    python tests/train/kill_at.py record N train ...  # dies after checkpoint N was renamed into place, before
                                                      # the ledger recorded it
"""

import os
import signal
import sys

import torch

from kmodel.cli import main
from kmodel.train.trainer import Trainer


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


mode, point, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "step":
    take_step = Trainer.train_step

    def train_step(self):
        if self.step == int(point):
            die()
        return take_step(self)

    Trainer.train_step = train_step
elif mode == "save":
    save = torch.save

    def save_then_die(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        if f".{point}.tmp-" in str(path):
            die()

    torch.save = save_then_die
elif mode == "record":
    from kmodel.ledger import Ledger

    record = Ledger.record_checkpoint

    def die_before_recording(self, *, step, **kwargs):
        if step == int(point):
            die()
        return record(self, step=step, **kwargs)

    Ledger.record_checkpoint = die_before_recording
else:
    sys.exit(f"unknown mode {mode!r}")
sys.exit(main(argv))
