"""Model loading errors and depth pruning."""

from __future__ import annotations

import pytest
import torch

from fedcollm.errors import FedCoLLMError
from fedcollm.models.loading import load_base_model, prune_layers, resolve_source, tiny_model
from fedcollm.models.lora import attach_lora


def test_unknown_lora_target_lists_the_modules_that_exist():
    with pytest.raises(FedCoLLMError) as err:
        attach_lora(tiny_model(64), 8, 16, 0.0, ("q_proj", "qkv"))
    assert str(err.value) == ("config: lora.target_modules ['qkv'] not in LlamaForCausalLM; its linear "
                              "modules are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")


@pytest.mark.parametrize("source,message", [
    ("/nowhere/model.gguf", "model file '/nowhere/model.gguf' not found"),
    ("/nowhere/folder", "model path '/nowhere/folder' not found"),
])
def test_missing_model_files(source, message):
    with pytest.raises(FedCoLLMError, match=message):
        resolve_source(source)


def test_folder_without_config(tmp_path):
    with pytest.raises(FedCoLLMError, match="has no config.json"):
        resolve_source(str(tmp_path))


def test_pruning_keeps_head_and_tail_layers_in_order():
    model = tiny_model(64)
    layers = list(model.model.layers)
    pruned = prune_layers(model, 1, 1)
    assert list(pruned.model.layers) == [layers[0], layers[3]]
    assert pruned.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    assert pruned(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    with pytest.raises(FedCoLLMError, match="exceeds the LLM's 2 layers"):
        prune_layers(pruned, 2, 1)


def test_tiny_model_is_the_same_in_every_process():
    a = load_base_model("tiny-random", torch.float32, torch.device("cpu"))
    b = load_base_model("tiny-random", torch.float32, torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
