"""Zero-shot multiple-choice evaluation by log-likelihood (lm-evaluation-harness protocol)."""
