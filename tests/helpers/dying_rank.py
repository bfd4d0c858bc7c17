"""A `regmean` entry point whose rank 1 dies abruptly after its first batch (for the failure test)."""

import os

import regmean.measure as m
from regmean.cli import app

original = m.Accumulator._hook


def dying_hook(self, site):
    hook = original(self, site)

    def wrapped(mod, args):
        if int(os.environ.get("RANK", "0")) == 1:
            os._exit(17)
        return hook(mod, args)

    return wrapped


m.Accumulator._hook = dying_hook
app()
