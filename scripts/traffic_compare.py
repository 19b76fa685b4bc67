"""Is one traffic point's accuracy really different from another's? Paired bootstrap over the
same validation items (fedcollm.experiment.significance), per seed and pooled over the seeds
both points have, for the SLM and the LLM, from the per-item `correct` lists a traffic report
keeps in its traffic.json. The two points may come from two reports (two code versions).

    python scripts/traffic_compare.py runs/traffic-s17ef/traffic.json "all r8 int1" \
        results/traffic/traffic.json "all r8 int4" [DATASET]
"""

from __future__ import annotations

import json
import sys

from fedcollm.experiment.significance import paired_bootstrap


def _point(path: str, label: str, dataset: str) -> dict:
    points = json.load(open(path))["results"].get(dataset, {})
    if label not in points:
        sys.exit(f"{path}: no point {label!r} on {dataset} (it has: {', '.join(sorted(points)) or 'none'})")
    return points[label]


def main(path_a: str, label_a: str, path_b: str, label_b: str, dataset: str = "arc_easy") -> None:
    a, b = _point(path_a, label_a, dataset), _point(path_b, label_b, dataset)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        sys.exit(f"{label_a} and {label_b} share no seed")
    print(f"{dataset}: {label_a} ({path_a}) − {label_b} ({path_b}), accuracy points, 95% paired bootstrap")
    for model in ("slm", "llm"):
        rows = [(f"seed {s}", [a[s][model]["correct"]], [b[s][model]["correct"]]) for s in seeds]
        rows.append((f"pooled over seeds {','.join(seeds)}", [a[s][model]["correct"] for s in seeds],
                     [b[s][model]["correct"] for s in seeds]))
        for name, x, y in rows:
            iv = paired_bootstrap(x, y)
            mark = " *" if iv.significant else ""
            print(f"  {model.upper()} {name}: {100 * iv.value:+.1f} [{100 * iv.low:+.1f}, {100 * iv.high:+.1f}]{mark}")


if __name__ == "__main__":
    main(*sys.argv[1:])
