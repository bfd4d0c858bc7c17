"""regmean: dataless knowledge fusion. Measure statistics, merge fine-tuned models, evaluate.

stats = regmean.measure(model_dir, examples)       # per owner, on private data
regmean.save_statistics(stats, "stats/")           # shareable safetensors file
regmean.merge("merge.yaml", "merged/")             # K models + K statistics files -> one model folder
"""

__version__ = "0.1.0"

from regmean.errors import RegmeanError  # noqa: E402
from regmean.io.data import Example, load_examples  # noqa: E402
from regmean.measure import measure  # noqa: E402
from regmean.merge import MergeConfig, merge  # noqa: E402
from regmean.stats import Statistics, StatisticsFile, combine  # noqa: E402
from regmean.stats import save as save_statistics  # noqa: E402

__all__ = [
    "Example",
    "MergeConfig",
    "RegmeanError",
    "Statistics",
    "StatisticsFile",
    "__version__",
    "combine",
    "load_examples",
    "measure",
    "merge",
    "save_statistics",
]
