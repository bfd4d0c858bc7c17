"""The measure step: run a model over local data and accumulate the input statistics of its linear layers.

- `sites`: which distinct input tensors the linear layers read, and the padding mask of each (one forward pass).
- `batching`: tokenised batches with a mask per stream, and the forward pass.
- `accumulate`: the sums x x^T, x and row counts per site, collected by forward hooks.
- `pipeline`: `measure`, which runs them over the data (in blocks of sites that fit a memory limit, on any number
  of processes) and returns the statistics.
- `fisher`: the diagonal Fisher, another statistic (its file, its measuring, its command in one module).
"""

from regmean.measure.fisher import FISHER
from regmean.measure.pipeline import measure
from regmean.statistic import Statistic
from regmean.stats import GRAM

STATISTICS: dict[str, Statistic] = {statistic.command: statistic for statistic in (GRAM, FISHER)}
"""The statistics regmean measures, by the command that measures each. A statistic is one module plus its line here."""

__all__ = ["STATISTICS", "measure"]
