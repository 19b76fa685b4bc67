"""A base model with a trained adapter merged in, saved as a plain Hugging Face model folder.

What a run trains is a LoRA adapter on a base that only fedcollm builds in the SLM's case (the
LLM with a middle block of layers removed, models/loading.prune_layers). Merged and saved with its
tokenizer (chat template included), it loads with `AutoModelForCausalLM.from_pretrained(folder)`
alone: no fedcollm, peft or GGUF file needed to serve it. The merge is checked, not trusted: on a
probe text the merged model must give the adapted model's logits, and the saved folder, loaded
back, the merged model's, or nothing is left at the destination.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from fedcollm.data.encode import bos_prefix
from fedcollm.errors import FedCoLLMError

PROBE = "Question: Which gas do plants take in from the air to make food?\nAnswer: carbon dioxide"
# Two checks, each between models that should compute the same function: the merged model
# against the adapter on its base (both fp32: merging only reorders sums, ≈1e-5 seen), and the
# folder loaded back in fp32 against the merged model with its weights rounded to the saved dtype
# (the same values, in fp32 too: a model cast whole would also round its rotary tables, which
# the folder does not hold). Logits, not probabilities: an absolute bound that a wrong layer or a
# lost adapter exceeds by far.
TOLERANCE = 1e-3


def check_destination(out: Path) -> Path:
    """`out`, refused if it holds anything (an earlier export, or anything else, is never overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedCoLLMError(f"--out {out}: already exists and is not an empty folder; give a new one")
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def export_merged(adapted, tokenizer, out: Path, dtype: torch.dtype, provenance: dict) -> dict:
    """Merge (a copy of) the PeftModel `adapted` (on the CPU, in fp32) into its base, cast to
    `dtype`, save it with `tokenizer` at `out` (which must not hold anything yet), load it back,
    and check both steps' logits on PROBE. Returns what `out/fedcollm-export.json` records."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    out = check_destination(Path(out))
    # Merging writes the adapter into the base's weights, which the caller's other models may share
    # (components keeps one copy of them per process): merge a copy, and leave `adapted` as it was.
    adapted = copy.deepcopy(adapted).eval()  # eval: no dropout, the logits compared are the function saved
    ids = torch.tensor([bos_prefix(tokenizer) + tokenizer(PROBE, add_special_tokens=False)["input_ids"]])
    want = _logits(adapted, ids)
    merged = adapted.merge_and_unload()
    merge_diff = (_logits(merged, ids) - want).abs().max().item()
    with torch.no_grad():  # round to the values the folder will hold, computed in fp32 as before
        for param in merged.parameters():
            param.copy_(param.to(dtype))
    as_saved = _logits(merged, ids)
    merged = merged.to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"  # moved to `out` once checked
    shutil.rmtree(staging, ignore_errors=True)  # what an export cut short left
    staging.mkdir()
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        loaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)  # the saved values, exactly
        load_diff = (_logits(loaded, ids) - as_saved).abs().max().item()
        for what, diff in (("the merged model's logits differ from the adapted model's", merge_diff),
                           ("the saved folder, loaded back, gives other logits than the merged model", load_diff)):
            if not diff <= TOLERANCE:  # NaN fails too
                raise FedCoLLMError(f"export: {what} by {diff:.3g} (tolerance {TOLERANCE}); nothing was written "
                                    f"to {out}")
        record = {**provenance, "dtype": str(dtype).removeprefix("torch."), "layers": merged.config.num_hidden_layers,
                  "probe": PROBE, "merge_max_abs_logit_diff": merge_diff, "reload_max_abs_logit_diff": load_diff}
        (staging / "fedcollm-export.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record
