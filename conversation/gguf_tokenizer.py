"""The default model's tokenizer read straight from its GGUF, without torch or transformers.

The processors count and cut text with the Rust tokenizer alone
(model_files.load_counting_tokenizer). Its usual source, the converted model
folder, is made by transformers and torch (model_files.default_model_dir), which
the processors' install leaves out (pyproject's `worker` extra). So where that
folder is absent, the tokenizer is built here from the GGUF's own tokenizer
fields (`tokenizer.ggml.*`, read with the light `gguf` package): the same
tokenizer.json that transformers writes for this GPT-2-style byte-level BPE, field
for field. tests/test_light_install.py compares the two on the converted folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conversation.exceptions import ModelError

CONTROL_TOKEN = 3  # llama.cpp's token type of the special (added) tokens


def _fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.ggml.")}


def tokenizer_json(path: Path) -> dict[str, Any]:
    """tokenizer.json's content for the GGUF at `path` (a `gpt2` tokenizer model)."""
    fields = _fields(path)
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise ModelError(f"{path}: tokenizer model {fields.get('tokenizer.ggml.model')!r}, only gpt2 is read here")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields["tokenizer.ggml.token_type"]
    added = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind == CONTROL_TOKEN
    ]
    add_prefix_space = bool(fields.get("tokenizer.ggml.add_space_prefix", False))
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": []},
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": add_prefix_space,
            "trim_offsets": False,
            "use_regex": True,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[int(fields.get("tokenizer.ggml.unknown_token_id", 0))],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": [merge.split(" ", 1) for merge in fields["tokenizer.ggml.merges"]],
        },
    }


def counting_tokenizer(path: Path) -> Any:
    """A `tokenizers.Tokenizer` for the GGUF at `path`."""
    import json

    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(tokenizer_json(path)))
