"""A `regmean` entry point whose rank DIE_RANK (default 1) dies abruptly when it computes its first step."""

import os

from regmean.cli import app
from regmean.methods.regmean import RegMean

original_compute = RegMean.compute


def dying_compute(self, step, data):
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("DIE_RANK", "1")):
        os._exit(17)
    return original_compute(self, step, data)


RegMean.compute = dying_compute
app()
