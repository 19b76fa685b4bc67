"""What an evaluation set's scores are called, by its kind (no torch: reports read this)."""

MCQ, COMPLETION = "multiple choice", "prompt-completion"
# The figures a row reports per kind, the first being the one to read: accuracies are fractions
# (shown in %); loss (nats per completion token) and perplexity are lower-is-better.
METRICS = {MCQ: ("acc", "acc_norm"), COMPLETION: ("loss", "ppl")}


def metrics_of(scores: dict) -> tuple[str, ...]:
    """The figures a score dict holds (a row's `slm` or `llm`)."""
    return METRICS[COMPLETION] if "loss" in scores else METRICS[MCQ]
