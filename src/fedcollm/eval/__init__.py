"""Evaluation: zero-shot multiple-choice accuracy by log-likelihood (lm-evaluation-harness protocol),
or the loss of held-out prompt-completion data; eval/scoring.py picks by the set's kind."""
