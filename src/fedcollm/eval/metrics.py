"""What an evaluation set's scores are called, by its kind (no torch: reports read this)."""

MCQ, COMPLETION = "multiple choice", "prompt-completion"
# The figures a row reports per kind, the first being the one to read: accuracies are fractions
# (shown in %); loss (nats per completion token) and perplexity are lower-is-better.
METRICS = {MCQ: ("acc", "acc_norm"), COMPLETION: ("loss", "ppl")}


def metrics_of(scores: dict) -> tuple[str, ...]:
    """The figures a score dict holds (a row's `slm` or `llm`)."""
    return METRICS[COMPLETION] if "loss" in scores else METRICS[MCQ]

# What a score keeps per item for the paired tests over the items (experiment/significance.py):
# which items each accuracy got right; each item's summed loss over its completion tokens and
# their count (the set's loss is the one summed over the other).
ITEMS = {MCQ: ("correct", "correct_norm"), COMPLETION: ("item_nll", "item_tokens")}
LOWER_IS_BETTER = frozenset(METRICS[COMPLETION])


def items_of(scores: dict) -> tuple[str, ...]:
    """The per-item keys a score dict of this kind keeps."""
    return ITEMS[COMPLETION] if "loss" in scores else ITEMS[MCQ]


def item_key(metric: str) -> str:
    """Where a score keeps its per-item scores for `metric` (the paired tests): which items acc or
    acc_norm got right, or each item's summed loss."""
    return {"acc": ITEMS[MCQ][0], "acc_norm": ITEMS[MCQ][1], "loss": ITEMS[COMPLETION][0]}[metric]
