"""Shared fixtures: a synthetic MCQ dataset in the generic JSONL form and smoke configs on it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from fedcollm.config import load_config

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
THINGS = ["apple", "leaf", "sky", "sun", "coal", "snow", "carrot", "grape"]


def write_mcq(path: Path, n: int, seed: int) -> Path:
    """n generic-form questions ("What color is the X?") with 4 choices."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            k = rng.randrange(len(THINGS))
            wrong = rng.sample([c for c in COLORS if c != COLORS[k]], 3)
            choices = wrong + [COLORS[k]]
            rng.shuffle(choices)
            fh.write(json.dumps({"id": f"q{seed}-{i}", "question": f"What color is the {THINGS[k]}?",
                                 "choices": choices, "answer": choices.index(COLORS[k])}) + "\n")
    return path


@pytest.fixture(scope="session")
def mcq_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("mcq")
    return write_mcq(d / "train.jsonl", 60, 0), write_mcq(d / "eval.jsonl", 12, 1)


@pytest.fixture
def smoke_overrides(mcq_files, tmp_path) -> list[str]:
    train, evals = mcq_files
    return [
        'data.dataset="mcq_jsonl"', f'data.train_file="{train}"', f'data.eval_file="{evals}"',
        f'run.out_dir="{tmp_path / "run"}"', "run.progress=false",
    ]


@pytest.fixture
def smoke_cfg(smoke_overrides):
    return load_config(overrides=smoke_overrides, preset="smoke")


@pytest.fixture
def adapted_slm(smoke_cfg):
    """(the smoke SLM, in eval mode, with a LoRA adapter that changes what it computes (B drawn, not 0),
    its tokenizer)."""
    from fedcollm import components  # noqa: PLC0415

    model = components.build_slm(smoke_cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval(), components.tokenizer(smoke_cfg, "slm")
