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
    a = load_base_model("tiny-random", torch.float32)
    b = load_base_model("tiny-random", torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_server_holds_the_llm_weights_once(smoke_cfg):
    """LLM and pruned SLM built in one process share the frozen base tensors; adapters do not."""
    from fedcollm import components  # noqa: PLC0415

    llm, slm = components.build_llm(smoke_cfg), components.build_slm(smoke_cfg)
    llm_layers, slm_layers = llm.get_base_model().model.layers, slm.get_base_model().model.layers
    assert len(slm_layers) == 2 and len(llm_layers) == 4
    for slm_idx, llm_idx in ((0, 0), (1, 3)):  # keep first 1 + last 1
        a = slm_layers[slm_idx].self_attn.q_proj
        b = llm_layers[llm_idx].self_attn.q_proj
        assert a.base_layer.weight.data_ptr() == b.base_layer.weight.data_ptr()
        assert a.lora_A["default"].weight.data_ptr() != b.lora_A["default"].weight.data_ptr()
    emb = llm.get_base_model().model.embed_tokens.weight
    assert slm.get_base_model().model.embed_tokens.weight.data_ptr() == emb.data_ptr()
    # Training one adapter leaves the other model's outputs alone (no shared trainable state).
    ids = torch.tensor([[5, 6, 7, 8]])
    before = llm(ids).logits.detach().clone()
    for n, p in slm.named_parameters():
        if "lora_B" in n:
            p.data.fill_(0.5)
    assert torch.equal(llm(ids).logits, before)
    assert not torch.equal(slm(ids).logits, components.build_slm(smoke_cfg)(ids).logits)


def test_client_prunes_before_moving_to_the_device(smoke_cfg, monkeypatch):
    """A process without the LLM (a client) moves only the kept layers: every tensor that is
    moved belongs to the pruned model."""
    from fedcollm import components  # noqa: PLC0415

    moved: list[int] = []
    real_to = torch.nn.Module.to

    def spy_to(self, *args, **kwargs):
        if "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args):  # a move, not a cast
            moved.append(sum(1 for m in self.modules() if type(m).__name__.endswith("DecoderLayer")))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(components, "_LLM_WEIGHTS", {})
    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    slm = components.slm_base(smoke_cfg)
    assert len(slm.model.layers) == 2
    assert moved and max(moved) == 2, moved  # never the 4-layer LLM


def _saved_slm_adapter(tmp_path, prune=(1, 1), with_config=True):
    """A run folder's OUT/adapters/slm: LoRA on a pruned tiny model, with the run's config.toml."""
    model = attach_lora(prune_layers(tiny_model(64), *prune), 4, 8, 0.0, ("q_proj", "v_proj"))
    torch.nn.init.normal_(next(p for n, p in model.named_parameters() if "lora_B" in n))  # not the zero init
    folder = tmp_path / "run" / "adapters" / "slm"
    model.save_pretrained(folder)
    if with_config:
        (tmp_path / "run" / "config.toml").write_text(
            f'[model]\nllm = "tiny-random"\nslm = ""\nslm_keep_first = {prune[0]}\nslm_keep_last = {prune[1]}\n')
    return model, folder


def test_a_saved_adapter_loads_only_on_the_base_it_was_trained_on(tmp_path):
    from fedcollm.models.lora import adapter_state, load_saved_adapter  # noqa: PLC0415

    trained, folder = _saved_slm_adapter(tmp_path)
    loaded = load_saved_adapter(prune_layers(tiny_model(64), 1, 1), str(folder), (1, 1))
    for (k, a), (k2, b) in zip(adapter_state(trained).items(), adapter_state(loaded).items()):
        assert k == k2 and torch.equal(a, b)
    # The whole model, or other layers of the same count: its run's config.toml says which.
    with pytest.raises(FedCoLLMError, match=r"trained on a base with --prune 1,1 \(its run's config.toml\), not no --prune"):
        load_saved_adapter(tiny_model(64), str(folder))
    with pytest.raises(FedCoLLMError, match=r"--prune 1,1 .*, not --prune 2,0"):
        load_saved_adapter(prune_layers(tiny_model(64), 2, 0), str(folder), (2, 0))


def test_an_adapter_outside_a_run_folder_is_checked_by_its_layer_count(tmp_path):
    from fedcollm.models.lora import load_saved_adapter  # noqa: PLC0415

    _, folder = _saved_slm_adapter(tmp_path, with_config=False)
    with pytest.raises(FedCoLLMError, match="adapts 2 decoder layers, the model has 4: an SLM adapter needs"):
        load_saved_adapter(tiny_model(64), str(folder))
    with pytest.raises(FedCoLLMError, match="no adapter_config.json and adapter_model.safetensors there"):
        load_saved_adapter(tiny_model(64), str(tmp_path / "nothing"))
