"""A `regmean` entry point whose rank 1 dies abruptly in the first batch of block DIE_IN_BLOCK (default 1)."""

import os

from regmean.cli import app
from regmean.measure.accumulate import Accumulator

original_init, original_hook = Accumulator.__init__, Accumulator._hook
blocks_started = 0


def counting_init(self, *args, **kwargs):
    global blocks_started
    blocks_started += 1
    original_init(self, *args, **kwargs)


def dying_hook(self, site):
    hook = original_hook(self, site)

    def wrapped(mod, args):
        if int(os.environ.get("RANK", "0")) == 1 and blocks_started >= int(os.environ.get("DIE_IN_BLOCK", "1")):
            os._exit(17)
        return hook(mod, args)

    return wrapped


Accumulator.__init__, Accumulator._hook = counting_init, dying_hook
app()
