"""Paired bootstrap over the test items: is a difference between two methods real?

Both methods are scored on the same items, so the test resamples items (with replacement) and
recomputes the statistic on each resample; the 2.5th and 97.5th percentiles give the 95%
interval. Per seed it uses that seed's per-item scores; pooled over seeds, each item's score is
its mean over the seeds (the items are the same for every seed). A per-item score is 0/1, or a
fraction where a result is a mean over clients (standalone); for a loss it is the item's loss
summed over its answer tokens, and the statistic is a ratio of sums, as the set's loss is: summed
scores over summed token counts (`sizes`), on every resample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 5000


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on the items themselves
    low: float  # 95% bootstrap interval
    high: float
    reference: float  # no effect: 0 for a difference, 1 for a ratio

    @property
    def significant(self) -> bool:
        """The 95% interval lies wholly on one side of `reference`."""
        return not self.low <= self.reference <= self.high


def paired_bootstrap(a: list[list[float]], b: list[list[float]], statistic: str = "diff",
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, sizes: list[float] | None = None) -> Interval:
    """a, b: seeds × items scores of two methods (the same items, in the same order, per seed).

    statistic "diff": mean(a) − mean(b); "ratio": mean(a) / mean(b). Seeds are pooled by
    averaging each item's score over them. With `sizes` (one per item, the same for both: an
    item's answer tokens), each mean is a ratio of sums instead, sum(scores) / sum(sizes).
    """
    x, y = np.asarray(a, dtype=np.float64).mean(0), np.asarray(b, dtype=np.float64).mean(0)
    if x.shape != y.shape or x.ndim != 1 or not len(x):
        raise ValueError(f"paired scores must cover the same items, got {x.shape} and {y.shape}")
    w = np.ones_like(x) if sizes is None else np.asarray(sizes, dtype=np.float64)
    if w.shape != x.shape:
        raise ValueError(f"sizes must give one per item, got {w.shape} for {x.shape}")
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, samples, 500):  # chunks bound the index matrix's memory
        idx = rng.integers(0, len(x), size=(min(500, samples - start), len(x)))
        n = w[idx].sum(1)
        mx, my = x[idx].sum(1) / n, y[idx].sum(1) / n
        stats.append(mx - my if statistic == "diff" else mx / np.maximum(my, 1e-12))
    boot = np.concatenate(stats)
    mx, my = x.sum() / w.sum(), y.sum() / w.sum()
    value = mx - my if statistic == "diff" else mx / max(my, 1e-12)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Interval(float(value), float(low), float(high), 0.0 if statistic == "diff" else 1.0)
