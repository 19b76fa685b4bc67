"""Plain torch training loops: answer-only SFT (clients) and mutual KD (server)."""
