"""Join runs of one suite made apart (seeds run side by side, or on other machines) into one results.json, which
`regmean bench SUITE --out OUT` then reports as one run: every joined seed is kept, none rerun.

python benchmarks/join_results.py OUT RUN [RUN ...]

OUT/results.json, if there, is joined too. The runs must have the same settings and no (suite, seed) in common.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def joined(files: list[Path]) -> dict:
    """The runs in `files` as one: their rows, times and curves together; refused where settings or seeds clash."""
    runs = [(f, json.loads(f.read_text())) for f in files]
    first_file, first = runs[0]
    seen: dict[tuple[str, int], Path] = {}
    out = {"settings": first["settings"], "seeds": [], "rows": [], "times": [], "curves": []}
    for f, run in runs:
        if run["settings"] != first["settings"]:
            changed = sorted(
                k for k in run["settings"] | first["settings"] if run["settings"].get(k) != first["settings"].get(k)
            )
            raise SystemExit(f"{f}: settings differ from {first_file} ({', '.join(changed)}): not one experiment")
        mine = {(r["suite"], r["seed"]) for r in run["rows"]}
        clash = sorted(mine & seen.keys())
        if clash:
            raise SystemExit(f"{f}: {clash[0][0]} seed {clash[0][1]} is also in {seen[clash[0]]}; join each seed once")
        seen.update(dict.fromkeys(mine, f))
        for part in ("rows", "times", "curves"):
            out[part] += run[part]
    out["seeds"] = sorted({seed for _, seed in seen})
    return out


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1]) / "results.json"
    files = [Path(a) / "results.json" if Path(a).is_dir() else Path(a) for a in sys.argv[2:]]
    files = ([out] if out.is_file() and out not in files else []) + files
    for f in files:
        if not f.is_file():
            raise SystemExit(f"{f}: no such results file; give a run folder of `regmean bench`")
    result = joined(files)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"{out}: seeds {result['seeds']} from {len(files)} runs; now `regmean bench SUITE --out {out.parent}`")


if __name__ == "__main__":
    main()
