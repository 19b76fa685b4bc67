"""Does a transport change what a traffic point scores? For each run of TRANSPORT (default fp16)
in a traffic.json, count the test items its SLM and LLM score alike with the fp32 and int8 runs
of the same modules, rank and seed (the per-item `correct` lists the report keeps).

    python scripts/traffic_same_items.py results/traffic/traffic.json [TRANSPORT]
"""

from __future__ import annotations

import json
import sys


def main(path: str, transport: str = "fp16") -> None:
    for dataset, points in json.load(open(path))["results"].items():
        for key in sorted(k for k in points if k.endswith(f" {transport}")):
            base = key[: -len(transport)]
            for seed, run in sorted(points[key].items()):
                line = [f"{dataset} {key} seed {seed}: SLM {100 * run['slm']['acc']:.1f} LLM {100 * run['llm']['acc']:.1f}"]
                for other in ("fp32", "int8"):
                    ref = points.get(base + other, {}).get(seed)
                    if ref and other != transport:
                        same = [sum(a == b for a, b in zip(run[m]["correct"], ref[m]["correct"])) for m in ("slm", "llm")]
                        line.append(f"as {other}: SLM {same[0]}, LLM {same[1]} of {len(run['slm']['correct'])} items")
                print("; ".join(line))


if __name__ == "__main__":
    main(*sys.argv[1:])
