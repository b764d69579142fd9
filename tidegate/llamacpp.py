"""llama.cpp's OpenAI-compatible server (`llama-cpp-python[server]`), built from PyPI's
source into a cache of its own, and started on loopback in front of the default model's
GGUF: the provider of the `engine: openai` tests and of `tidegate bench engines`.

It is not a dependency of tidegate, nor in the project's .venv: the sdist compiles
llama.cpp (140 C/C++ units: 16 minutes of wall time on this project's 2 shared cores,
9 minutes of CPU; a 173 MiB venv), which `make setup` and `make test` should not pay.
`make llama-cpp` (and `make test-engines`) builds it once, with this module's
`install`, into `~/.cache/tidegate/llama-cpp-VERSION-CPUTAG`, a venv of its own; the
tests and the benchmark find it there (or at TIDEGATE_LLAMA_PYTHON, an interpreter that
has it) and are skipped, or refuse, with the make command otherwise.

The build is `GGML_NATIVE=ON` (`-march=native`): the cache is this machine's, and the
comparison with the built-in engine is only fair with each at its best on this CPU
(torch picks AVX-512 at run time; a portable ggml build stops at AVX2). A native build
can die of SIGILL on another CPU, so the folder is named after this CPU's feature flags
(`cpu_tag`): a home directory shared with another CPU model builds its own. The
multimodal library (`LLAVA_BUILD`) is left out: a text model never loads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tidegate.kafka_broker import cache_dir
from tidegate.processes import DevStackError, free_port, spawn, stop_pid, wait_listening

LLAMA_CPP_VERSION = "0.3.36"
REQUIREMENT = f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}"
CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF"
BUILD_NICE = 5  # the machine is shared: the build yields to tests
MARKER = ".tidegate-installed"  # written last: a folder without it is an interrupted build
PYTHON_ENV = "TIDEGATE_LLAMA_PYTHON"
INSTALL_HINT = "`make llama-cpp` (builds llama-cpp-python[server] from source into ~/.cache/tidegate, once)"
START_TIMEOUT_S = 120.0


def cpu_tag() -> str:
    """8 hex digits of this CPU's feature flags: what a native build may use."""
    flags = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((line.split(":", 1)[1] for line in lines if line.startswith(("flags", "Features"))), "")
    return hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:8]


def venv_dir() -> Path:
    return cache_dir() / f"llama-cpp-{LLAMA_CPP_VERSION}-{cpu_tag()}"


def server_python() -> Path | None:
    """The interpreter that runs `python -m llama_cpp.server`: TIDEGATE_LLAMA_PYTHON, or
    the cached build's; None when neither is there."""
    named = os.environ.get(PYTHON_ENV)
    if named:
        return Path(named) if Path(named).exists() else None
    folder = venv_dir()
    return folder / "bin" / "python" if (folder / MARKER).exists() else None


def missing_reason() -> str | None:
    """Why the server cannot start here (for a test's skip), or None."""
    if server_python() is None:
        return f"llama.cpp's server is not installed: run {INSTALL_HINT}"
    return None


def install(quiet: bool = False) -> Path:
    """Builds the server into `venv_dir()` unless it is there; a file lock makes two
    concurrent installs build once. Prints the build's wall time and size."""
    target = venv_dir()
    if (target / MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / MARKER).exists():
            _build(target, quiet)
    return target


def _build(target: Path, quiet: bool) -> None:
    """A fresh venv in `target`, built in place (a venv's paths are absolute: it cannot be
    built elsewhere and moved); the marker last, so an interrupted build is redone."""
    shutil.rmtree(target, ignore_errors=True)
    started = time.monotonic()
    _run([sys.executable, "-m", "venv", str(target)])
    python = str(target / "bin" / "python")
    _run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    env = {
        **os.environ,
        "CMAKE_ARGS": f"{CMAKE_ARGS} {os.environ.get('CMAKE_ARGS', '')}".strip(),  # the caller's flags win
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1),
    }
    pip = [python, "-m", "pip", "install", "--no-cache-dir", *(["--quiet"] if quiet else []), REQUIREMENT]
    print(f"building {REQUIREMENT} from source into {target} (CMAKE_ARGS={env['CMAKE_ARGS']}); this takes a while")
    _run(["nice", "-n", str(BUILD_NICE), *pip], env)
    (target / MARKER).write_text(f"{REQUIREMENT} {env['CMAKE_ARGS']}\n")
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"built in {time.monotonic() - started:.0f} s: {target} holds {size / 2**20:.0f} MiB")


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise DevStackError(f"building llama.cpp's server failed (exit {result.returncode}): {' '.join(cmd)}")


class LlamaServer:
    """`python -m llama_cpp.server` on 127.0.0.1 serving one GGUF as `alias`.

    `interrupt_requests` is off: by default the server cuts a streamed answer short (a
    `[DONE]` mid-text) whenever another request waits, which a pool with more than one
    call in flight always has. The server answers one request at a time (one lock
    around its one model), so calls past the first wait in its own queue."""

    def __init__(self, model: Path, log_path: Path, threads: int = 2, alias: str = "default", ctx: int = 2048) -> None:
        python = server_python()
        if python is None:
            raise DevStackError(f"llama.cpp's server is not installed: run {INSTALL_HINT}")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.alias = alias
        self.log_path = log_path
        self.cmd = [
            str(python),
            "-m",
            "llama_cpp.server",
            *("--model", str(model), "--model_alias", alias),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(ctx)),
            *("--interrupt_requests", "False", "--verbose", "False"),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> LlamaServer:
        """Starts it and waits until it accepts connections (it loads the model first)."""
        self.proc = spawn(self.cmd, self.log_path)
        try:
            wait_listening(self.proc, self.port, "llama.cpp's server", self.log_path, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid)
            self.proc = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    """`python -m tidegate.llamacpp install | path` (the Makefile's steps)."""
    if argv[:1] == ["install"]:
        print(install(quiet="--quiet" in argv))
        return 0
    if argv[:1] == ["path"]:
        python = server_python()
        print(python if python is not None else f"not installed: {INSTALL_HINT}")
        return 0 if python is not None else 1
    print("usage: python -m tidegate.llamacpp install [--quiet] | path", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
