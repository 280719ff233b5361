"""How fast a run trains: tokens/s, model-FLOPs utilisation (MFU) and peak memory, in every log.

`ThroughputMixin` goes in front of a trainer class (techniques/sft.py, techniques/dpo.py). It
counts the tokens of every training batch on each process and adds to each training log (so to
metrics.jsonl, TensorBoard and every tracker) and to the final summary:

    tokens_per_s             all non-padding tokens of the step's batches, every process, per second
    supervised_tokens_per_s  the tokens the loss is computed on (labels != -100; DPO: answers)
    mfu                      model FLOP/s achieved / peak FLOP/s of the devices (None when unknown)
    peak_mem_gib             CUDA max allocated on a GPU, peak resident memory (RSS) on a CPU

and to the final summary (`train_` + each of these, plus `train_tokens`, `train_supervised_tokens`
and `train_seconds`: what the whole run trained on, and for how long).

The clock runs over optimizer steps only: evaluation time between two logs is left out.

FLOPs (PaLM, Chowdhury et al. 2022, appendix B; nanoGPT `estimate_mfu`; LitGPT `estimate_flops`):
a matmul weight of n elements costs 2n FLOPs per token forward, 2n backward for the input
gradient and 2n more for its own gradient when it trains, so 6n for a trained weight, 4n for a
frozen one (LoRA's base weights need no weight gradient) and 2n for a forward-only model (DPO's
reference). Attention adds 2 x 2 x d x T per token and layer forward (QKᵀ and AV over a context of
T), x3 in training: 12·L·d·T per token, 12·L·d·T² per example of T tokens. The LM head runs on the
supervised positions only (TRL's fused head), so its 2·V·d (x3 trained, x2 frozen) count per
supervised token. Embedding lookups, norms and activations are not counted (the usual convention);
gradient checkpointing's recomputed forward is not either (MFU, not hardware FLOPs utilisation).

Peak FLOP/s: the `peak_flops` setting when given; on CUDA, the dense figure of the device and dtype
from `GPU_PEAK_FLOPS`; on a CPU, a short matmul measurement in the dtype in use, cached per machine
(`measured_cpu_peak_flops`).
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Dense (no sparsity) FLOP/s per device from NVIDIA's datasheets; fp32 = non-tensor-core FP32,
# what PyTorch uses unless TF32 is enabled. The first name contained in the device name wins.
GPU_PEAK_FLOPS = (
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    ("L40S", {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12}),
    ("L4", {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12}),
    ("A10", {"bfloat16": 125e12, "float16": 125e12, "float32": 31.2e12}),
    ("T4", {"float16": 65e12, "float32": 8.1e12}),
    ("V100", {"float16": 125e12, "float32": 15.7e12}),
)
CPU_PEAK_CACHE = Path("~/.cache/ft-kit/cpu_peak_flops.json")


# ---------------------------------------------------------------- FLOPs of a model


@dataclass(frozen=True)
class FlopsPerToken:
    """FLOPs of one training step, by what they scale with (see the module docstring)."""

    per_token: float             # linear layers of the body (6n trained, 4n frozen), per input token
    per_supervised_token: float  # the LM head, per supervised token
    attention: float             # 12·L·d: times T² per example of T tokens

    def step_flops(self, tokens: int, supervised: int, squared_lengths: int) -> float:
        return self.per_token * tokens + self.per_supervised_token * supervised + self.attention * squared_lengths


def flops_per_token(model: nn.Module, forward_only: nn.Module | None = None) -> FlopsPerToken:
    """Count the matmul weights of `model` by whether they train (PEFT adapters, base weights,
    frozen layers all show in `requires_grad`); `forward_only` adds a model run without backward
    (DPO's reference: 2n per token, attention 4·L·d·T). Raises nothing; a model without a config
    gets no attention term."""
    from transformers.pytorch_utils import Conv1D

    def linear_flops(m: nn.Module, trained: int, frozen: int) -> float:
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        body = 0.0
        for module in m.modules():
            if module is head or not isinstance(module, (nn.Linear, Conv1D)):
                continue
            n = module.weight.numel() * (2 if module.weight.__class__.__name__ == "Params4bit" else 1)
            body += (trained if module.weight.requires_grad else frozen) * n
        head_flops = 0.0
        if head is not None:
            head_flops = (trained if head.weight.requires_grad else frozen) * head.weight.numel()
        return body, head_flops

    body, head = linear_flops(model, 6, 4)
    attention = 12 * _layers_times_width(model)
    if forward_only is not None:
        ref_body, ref_head = linear_flops(forward_only, 2, 2)
        body, head, attention = body + ref_body, head + ref_head, attention + 4 * _layers_times_width(forward_only)
    return FlopsPerToken(body, head, attention)


def _layers_times_width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is None:
        return 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, head_dim = getattr(text, "num_attention_heads", 0), getattr(text, "head_dim", None)
    width = heads * head_dim if heads and head_dim else getattr(text, "hidden_size", 0)
    return getattr(text, "num_hidden_layers", 0) * width


def batch_token_counts(inputs: dict) -> tuple[int, int, int]:
    """(tokens, supervised tokens, sum of squared example lengths) of one training batch.

    Padded rows: each row's length is its attention mask's sum. Padding-free rows (packing):
    examples are the runs between position ids that restart at 0. Supervised: `labels[:, 1:]` not
    -100 (the next-token targets); DPO batches (`completion_mask`): the answer tokens.
    """
    if "attention_mask" in inputs:
        lengths = inputs["attention_mask"].sum(dim=1)
    elif "position_ids" in inputs:
        starts = (inputs["position_ids"].flatten() == 0).nonzero().flatten().tolist() + [inputs["position_ids"].numel()]
        lengths = torch.tensor([b - a for a, b in zip(starts, starts[1:]) if b > a])
    else:
        lengths = torch.full((inputs["input_ids"].shape[0],), inputs["input_ids"].shape[1])
    if "labels" in inputs:
        supervised = int((inputs["labels"][:, 1:] != -100).sum())
    elif "completion_mask" in inputs:
        supervised = int(inputs["completion_mask"][:, 1:].sum())
    else:
        supervised = int(lengths.sum())
    return int(lengths.sum()), supervised, int((lengths.long() ** 2).sum())


# ---------------------------------------------------------------- peak FLOP/s and memory


def peak_flops(device: torch.device, dtype: torch.dtype, setting: float | None = None) -> float | None:
    """Peak FLOP/s of one device in `dtype`: `setting` when given, the CUDA table, or the CPU
    measurement. None for a GPU missing from the table (MFU is then left out, with a log line)."""
    if setting:
        return float(setting)
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        for key, figures in GPU_PEAK_FLOPS:
            if key in device_name and name in figures:
                return figures[name]
        log.info("no peak FLOP/s known for %s in %s: MFU left out (set PEAK_FLOPS to report it)", device_name, name)
        return None
    return measured_cpu_peak_flops(dtype)


def measured_cpu_peak_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` size x size matmuls in `dtype` on this CPU with the current
    thread count (2·size³ FLOPs each), after a warm-up: the highest figure seen so far on this
    machine, kept in `CPU_PEAK_CACHE` per CPU, thread count, dtype and torch version.

    Every call measures (well under a second) and the cache keeps the maximum: a measurement taken
    while other jobs share the cores comes out low (here once 60 GFLOP/s against ~2x that on a
    quiet machine), and a cache that kept the first figure would report MFU above 100% for good.
    """
    key = f"{platform.processor() or platform.machine()}|{_cpu_model()}|{torch.get_num_threads()}|{dtype}|{torch.__version__}"
    cache = CPU_PEAK_CACHE.expanduser()
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        cached = {}
    # Its own generator: drawing from the global RNG mid-training would change the dropout masks
    # after it, and a resumed run (which measures again) would train other steps (tests/test_resume.py).
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, dtype=dtype, generator=generator) for _ in range(2))
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    measured = 2 * size**3 / best
    if measured <= cached.get(key, 0.0):
        return cached[key]
    cached[key] = measured
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(cached, indent=1))
    except OSError:
        pass
    return measured


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def peak_memory_gib(device: torch.device) -> float:
    """CUDA max allocated memory of `device`, or this process's peak resident memory on a CPU, GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB


# ---------------------------------------------------------------- the trainer mixin


class ThroughputMixin:
    """Adds the speed figures of the module docstring to every training log; see there.

    A subclass may define `flops_reference()` returning a forward-only model counted per token
    (DPO's frozen reference), and the settings' `peak_flops` reaches it as `self.peak_flops_setting`.
    """

    peak_flops_setting: float | None = None

    def flops_reference(self) -> nn.Module | None:
        return None

    def training_step(self, model, inputs, *args, **kwargs):
        counts = getattr(self, "_speed_counts", None)
        if counts is None:
            self._speed_reset()
            counts = self._speed_counts
        if self._speed_started is None:
            self._speed_started = time.perf_counter()
        for i, value in enumerate(batch_token_counts(inputs)):
            counts[i] += value
        return super().training_step(model, inputs, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if getattr(self, "_speed_started", None) is not None:
                self._speed_paused += time.perf_counter() - start

    def _save_checkpoint(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super()._save_checkpoint(*args, **kwargs)
        finally:
            if getattr(self, "_speed_started", None) is not None:
                self._speed_paused += time.perf_counter() - start

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if getattr(self, "_speed_started", None) is not None and ("loss" in logs or "train_runtime" in logs):
            # close the interval since the last training log: its figures, and into the run's totals
            seconds = time.perf_counter() - self._speed_started - self._speed_paused
            if "loss" in logs:
                logs.update(self._speed_figures(self._speed_counts, seconds))
            self._speed_total = [t + c for t, c in zip(self._speed_total, self._speed_counts, strict=True)]
            self._speed_seconds += seconds
            self._speed_reset(keep_total=True)
            self._speed_started = time.perf_counter()
        if "train_runtime" in logs and getattr(self, "_speed_seconds", 0):
            figures = self._speed_figures(self._speed_total, self._speed_seconds, with_counts=True)
            logs.update({f"train_{key}": value for key, value in figures.items()})
        super().log(logs, start_time)

    def _speed_reset(self, keep_total: bool = False) -> None:
        self._speed_counts, self._speed_started, self._speed_paused = [0, 0, 0], None, 0.0
        if not keep_total:
            self._speed_total, self._speed_seconds = [0, 0, 0], 0.0

    def _speed_figures(self, counts: list[int], seconds: float, with_counts: bool = False) -> dict:
        totals = self.accelerator.reduce(torch.tensor(counts, device=self.args.device, dtype=torch.float64), "sum")
        tokens, supervised, squared = (float(v) for v in totals.tolist())
        seconds = max(seconds, 1e-9)
        figures = {"tokens_per_s": tokens / seconds, "supervised_tokens_per_s": supervised / seconds}
        if with_counts:  # the run's totals, every process: what it trained on
            figures.update(tokens=int(tokens), supervised_tokens=int(supervised), seconds=seconds)
        if not hasattr(self, "_flops_model"):
            self._flops_model = flops_per_token(self.accelerator.unwrap_model(self.model), self.flops_reference())
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else next(self.model.parameters()).dtype
            self._peak = peak_flops(self.args.device, dtype, self.peak_flops_setting)
        if self._peak:
            processes = self.accelerator.num_processes
            achieved = self._flops_model.step_flops(tokens, supervised, squared) / seconds / processes
            if achieved > self._peak and not self.peak_flops_setting:
                # The model FLOPs alone outran the measured peak: the measurement was low (a busy
                # machine at start). The achieved rate is a truer lower bound of the peak.
                log.warning("this run computes %.3g FLOP/s per process, above the measured peak of %.3g: the peak "
                            "was measured on a busy machine; using the achieved rate (set PEAK_FLOPS for a fixed "
                            "figure)", achieved, self._peak)
                self._peak = achieved
            figures["mfu"] = achieved / self._peak
        figures["peak_mem_gib"] = peak_memory_gib(self.args.device)
        return figures
