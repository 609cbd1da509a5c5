"""Run `kmodel data prepare ...` and SIGKILL it while the shard after the first K is half written (test helper).

    python -P tests/data/kill_prepare.py K data prepare RECIPE --out DIR ...
"""

import os
import signal
import sys

from kmodel.cli import main
from kmodel.data import shards

after, argv = int(sys.argv[1]), sys.argv[2:]
closed = 0
close, add = shards.ShardWriter.close, shards.ShardWriter.add


def counting_close(self, key):
    global closed
    closed += 1
    return close(self, key)


def add_then_maybe_die(self, encoded, text_bytes):
    add(self, encoded, text_bytes)
    if closed == after:
        self._tokens.flush()
        os.kill(os.getpid(), signal.SIGKILL)


shards.ShardWriter.close = counting_close
shards.ShardWriter.add = add_then_maybe_die
sys.exit(main(argv))
