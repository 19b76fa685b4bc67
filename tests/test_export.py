"""`models/export.py`: an adapter merged into its base and saved as a folder that transformers
loads alone, computing what the adapted model computes, the model given left as it was; a merge
that changes the model is refused and leaves nothing. (The command on a run's own SLM adapter:
test_smoke_run.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedcollm.errors import FedCoLLMError
from fedcollm.models.export import export_merged

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_saved_folder_computes_the_adapted_model(adapted_slm, tmp_path, dtype):
    model, tok = adapted_slm
    want = _logits(model)
    with model.disable_adapter():
        base = _logits(model)
    record = export_merged(model, tok, tmp_path / "merged", dtype, {"adapter": "drawn"})
    # merged into a copy: the adapted model, and the base weights it shares with the process's
    # other models (components), are as they were
    assert torch.equal(_logits(model), want)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")  # v4 would load fp32
    assert loaded.dtype == dtype and loaded.config.num_hidden_layers == record["layers"]
    got = _logits(loaded)
    tolerance = 1e-4 if dtype == torch.float32 else 0.1  # bf16 keeps about 3 significant digits
    assert (got - want).abs().max() < tolerance < (got - base).abs().max()  # the adapter is in it
    assert json.loads((tmp_path / "merged" / "fedcollm-export.json").read_text()) == record
    assert record["adapter"] == "drawn" and record["merge_max_abs_logit_diff"] < 1e-3


def test_a_merge_that_changes_the_model_is_refused_and_leaves_nothing(adapted_slm, tmp_path, monkeypatch):
    model, tok = adapted_slm
    # a "merge" that drops the adapter
    monkeypatch.setattr(PeftModel, "merge_and_unload", lambda self: self.base_model.unload(), raising=False)
    with pytest.raises(FedCoLLMError, match=r"^export: the merged model's logits differ from the adapted model's by "
                                            r"[0-9.e-]+ \(tolerance 0.001\); nothing was written to "):
        export_merged(model, tok, tmp_path / "bad", torch.float32, {})
    assert list(tmp_path.iterdir()) == []
