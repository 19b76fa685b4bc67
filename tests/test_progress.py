"""Progress lines where there is no terminal: how far, how long, and how long is left."""

from __future__ import annotations

from types import SimpleNamespace

from fedcollm.progress import LineProgress


def test_a_line_every_interval_with_the_time_left_at_this_passes_pace(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr("fedcollm.progress.time", SimpleNamespace(monotonic=lambda: now[0]))
    bar = LineProgress(total=100, desc="centralized LLM", initial=20)  # resumed after 20 steps
    now[0] = 10.0
    bar.update(1)
    assert capsys.readouterr().out == ""  # under PROGRESS_SECONDS (30) since the start: no line
    now[0] = 40.0
    bar.set_postfix(loss="1.234")
    bar.update(9)  # 10 steps in 40 s: 4 s a step, 70 steps left
    assert capsys.readouterr().out == "[fedcollm] centralized LLM: step 30 of 100 (30%), 40 s, ~280 s left, loss=1.234\n"
    now[0] = 60.0
    bar.update(1)
    assert capsys.readouterr().out == ""  # 20 s since the last line


def test_a_runs_rounds_show_with_the_time_the_run_has_left(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr("fedcollm.progress.time", SimpleNamespace(monotonic=lambda: now[0]))
    bar = LineProgress(total=3, desc="rounds", unit="round")
    now[0] = 40.0
    bar.update(0)  # the strategy's round 0 (the zero-shot scores): no round done, no pace to tell
    assert capsys.readouterr().out == ""
    now[0] = 100.0
    bar.update(1)
    assert capsys.readouterr().out == "[fedcollm] rounds: round 1 of 3 (33%), 100 s, ~200 s left\n"
