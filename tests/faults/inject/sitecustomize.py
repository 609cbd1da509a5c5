"""Fault injection for the processes a test launches (put this folder on PYTHONPATH): with
KMODEL_TEST_HANG=RANK:STEP:MARKER, the rank RANK sleeps inside step STEP + 1, once (MARKER records that it did),
as a rank stuck in a collective would: its peers wait for it in their next all-reduce."""

import os

_spec = os.environ.get("KMODEL_TEST_HANG")
if _spec and "RANK" in os.environ:  # only the training ranks, not the launcher
    import time

    from kmodel.train.trainer import Trainer

    _rank, _step, _marker = _spec.split(":", 2)
    _take_step = Trainer.train_step

    def _train_step(self):
        if os.environ["RANK"] == _rank and self.step == int(_step) and not os.path.exists(_marker):
            open(_marker, "w").close()
            time.sleep(3600)
        return _take_step(self)

    Trainer.train_step = _train_step
