"""The merge methods by name. A method is one module here (a `MergeMethod` subclass) plus its line below."""

from __future__ import annotations

from regmean.methods.average import Average
from regmean.methods.base import MergeMethod
from regmean.methods.dare import Dare
from regmean.methods.fisher import Fisher
from regmean.methods.regmean import RegMean
from regmean.methods.regmean_plusplus import RegMeanPlusPlus
from regmean.methods.task_arithmetic import TaskArithmetic
from regmean.methods.ties import Ties

METHODS: dict[str, type[MergeMethod]] = {
    method.name: method
    for method in (
        RegMean,
        RegMeanPlusPlus,
        Fisher,
        Average,
        TaskArithmetic,
        Ties,
        Dare,
    )
}
