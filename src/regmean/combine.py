"""`regmean stats combine`: statistics of one model measured on disjoint data shards, summed into exactly the
statistics of their union; each shard added once (its digest kept in the provenance), one protection for all."""

from __future__ import annotations

import warnings
from pathlib import Path

from regmean.errors import RegmeanError, RegmeanWarning, check_path
from regmean.statistic import ProvenanceRecord
from regmean.stats import WITHHELD, Statistics, StatisticsFile
from regmean.stats_checks import structure_problems


def combine(paths: list[str | Path]) -> Statistics:
    """Sum statistics of the same model measured on disjoint data: exactly the statistics of the union."""
    if isinstance(paths, str | Path) or not paths:
        raise RegmeanError("combine takes a list of statistics files or folders (at least one)")
    for path in paths:
        check_path(path, "combine's statistics")
    files = [StatisticsFile(p) for p in paths]
    first = files[0]
    records = [_identified_records(f) for f in files]
    problems = _repeated_parts(files, records)
    for f in files[1:]:
        if f.fingerprint != first.fingerprint:
            problems.append(f"{f.path}: measured on a different model than {first.path}; cannot combine")
        if set(f.modules) != set(first.modules):
            problems.append(_modules_problem(f, first))
        if f.dtype != first.dtype:
            problems.append(f"{f.path}: dtype {f.dtype} differs from {first.path} ({first.dtype})")
    problems += structure_problems(files) + _privacy_problems(files)
    if problems:
        raise RegmeanError(problems)
    _warn_of_lookalike_parts(files, records)
    total = first.load()
    for f in files[1:]:
        for name in total.sites:
            total.sites[name] = total.sites[name] + f.site(name)
        total.examples += f.examples
        total.tokens += f.tokens
    total.provenance = [r for part in records for r in part]
    if "dp" in total.privacy:  # parallel composition: each example is in one part, each part spent the budget once
        total.privacy["dp"] = {**total.privacy["dp"], "composition": f"parallel over {len(files)} disjoint parts"}
        total.protection += f"; {len(files)} parts on disjoint data combined (parallel composition: the same budget)"
    return total


def _modules_problem(f: StatisticsFile, first: StatisticsFile) -> str:
    """Why two files hold different modules: one withheld the token sites the other exposed, or include/exclude."""
    differ = set(f.modules) ^ set(first.modules)
    withheld = {m for st in (f, first) for m, why in st.skipped.items() if why == WITHHELD}
    if differ <= withheld:
        return (
            f"{f.path}: one of it and {first.path} withheld the token sites (the default) and the other measured "
            "them (--expose-token-counts); measure both parts the same way"
        )
    return f"{f.path}: measured different modules than {first.path} (check include/exclude)"


def _warn_of_lookalike_parts(files: list[StatisticsFile], records: list[list[ProvenanceRecord]]) -> None:
    """One warning where two parts record the same examples and tokens: the same data measured twice (other options,
    other bytes, another file name) would be counted twice; disjoint shards rarely count exactly alike."""
    seen: dict[tuple, tuple[Path, object]] = {}
    for f, part in zip(files, records, strict=True):
        for record in part:
            look = (record.get("examples"), record.get("tokens"), record.get("decoder_tokens"))
            if look[0] is not None and look in seen and seen[look][0] != f.path:
                other, data = seen[look]
                warnings.warn(
                    RegmeanWarning(
                        f"{f.path} (data {record.get('data')!r}) and {other} (data {data!r}) both record {look[0]} "
                        f"examples and {look[1]} tokens: if they are the same data measured twice, the combination "
                        "counts it twice"
                    ),
                    stacklevel=3,
                )
            seen.setdefault(look, (f.path, record.get("data")))


def _identified_records(f: StatisticsFile) -> list[ProvenanceRecord]:
    """A file's provenance records, each with the `part` digest of what its data contributed (`content_digest`):
    a measured file's one record gets the file's own, a combination's records keep those they were given."""
    if len(f.provenance) <= 1 and not any("part" in r for r in f.provenance):
        return [ProvenanceRecord(**(f.provenance[0] if f.provenance else {}), part=f.content_digest())]
    return [ProvenanceRecord(**r) for r in f.provenance]


def _repeated_parts(files: list[StatisticsFile], records: list[list[ProvenanceRecord]]) -> list[str]:
    """Each data shard added once: a file given twice, or a shard given beside a combination that holds it."""
    problems, seen = [], {}  # each part's digest -> the file that holds it, and that file's number of parts
    for f, part in zip(files, records, strict=True):
        digests = {r["part"] for r in part if "part" in r}
        again = next((seen[d] for d in digests if d in seen), None)
        if again is not None:
            whole = len(part) == 1 and again[1] == 1
            what = "the same statistics as" if whole else "statistics of a data shard already in"
            problems.append(f"{f.path}: {what} {again[0]}; each data shard may be added only once")
        seen |= {d: seen.get(d, (f.path, len(part))) for d in digests}
    return problems


def _privacy_problems(files: list[StatisticsFile]) -> list[str]:
    """Files combine only under one protection: the same sites withheld, and the same DP budget or none (their
    data are disjoint, so the budget holds for the sum: parallel composition)."""
    first = files[0]
    budget = _budget(first)
    problems = []
    seen: dict[str, Path] = {}
    for f in files:
        if f is not first and _budget(f) != budget:
            problems.append(
                f"{f.path}: released under another privacy budget than {first.path} ({_budget(f) or 'no DP'} vs "
                f"{budget or 'no DP'}); measure both parts with the same --dp-epsilon and --dp-delta"
            )
        names = {str(r.get("data")) for r in f.provenance} if budget else set()
        again = sorted(n for n in names if n in seen)
        if again:  # two releases of one data set spend two budgets: not what combine's parallel composition gives
            problems.append(
                f"{f.path}: data {again[0]!r} is named in {seen[again[0]]} too: combine cannot tell two DP releases of "
                "the same data (whose budgets add up) from disjoint shards sharing a file name; measure disjoint "
                "shards from files of different names"
            )
        seen |= dict.fromkeys(names, f.path)
    return problems


def _budget(f: StatisticsFile) -> tuple[float, float] | None:
    release = f.privacy.get("dp")
    return (release["epsilon"], release["delta"]) if release else None
