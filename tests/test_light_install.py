"""The gateway, the processors and the lag monitor run on tidegate's own requirements,
without the `worker` extra (torch, transformers): every module they import loads with
those blocked, and the processors' token counter for the default model comes from its
GGUF when no torch was there to convert it (conversation/gguf_tokenizer.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conversation.model_files import DEFAULT_MODEL_NAME, cache_dir, gguf_path

ROOT = Path(__file__).resolve().parent.parent
WORKER_ONLY = ("torch", "transformers", "accelerate", "safetensors")
LIGHT_PACKAGES = ("schemas", "streams", "conversation", "processors", "ops", "gateway", "tidegate")

# Run in a fresh interpreter: an import hook refuses the worker extra's packages, as
# an install without them would, then every module of the light packages is imported.
BLOCKED_IMPORTS = f"""
import importlib, importlib.abc, pkgutil, sys
BLOCKED = {WORKER_ONLY!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (the worker extra is not installed)", name=name)
        return None

sys.meta_path.insert(0, Refuse())
"""

IMPORT_EVERY_MODULE = f"""
names = []
for package in {LIGHT_PACKAGES!r}:
    names.append(package)
    names += [m.name for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")]
for name in names:
    if not name.endswith("__main__"):
        importlib.import_module(name)
from tidegate.cli import _parser
_parser()
print(len(names))
"""

COUNT_TOKENS = """
from conversation.model_files import load_counting_tokenizer
print(len(load_counting_tokenizer("default").encode("How deep is the harbour at low tide?").ids))
"""


def run_blocked(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_every_module_of_the_gateway_processors_monitor_and_cli_imports_without_the_worker_extra() -> None:
    assert int(run_blocked(IMPORT_EVERY_MODULE)) > 40


def test_the_processors_count_the_default_models_tokens_without_torch_before_any_conversion(tmp_path: Path) -> None:
    """An empty cache: nothing converted, and no torch to convert with."""
    assert int(run_blocked(COUNT_TOKENS, TIDEGATE_CACHE_DIR=str(tmp_path)).strip()) > 5


def test_the_tokenizer_read_from_the_gguf_is_the_one_transformers_converts() -> None:
    from conversation.gguf_tokenizer import tokenizer_json

    converted = cache_dir() / "models" / DEFAULT_MODEL_NAME / "tokenizer.json"
    if not converted.exists():
        pytest.skip("the default model is not converted yet (make model)")
    assert tokenizer_json(gguf_path()) == json.loads(converted.read_text())


def test_a_worker_without_the_worker_extra_says_which_extra_in_one_line() -> None:
    code = """
from tidegate.cli import main
print(main(["worker"]))
"""
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS + code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "2", result.stderr[-3000:]
    assert "pip install 'tidegate[worker]'" in result.stderr and "Traceback" not in result.stderr
