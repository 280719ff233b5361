"""What a run leaves in its output_dir, in one home. Every example calls two functions at its end:
`save_final` (the final folder, collectively, with its model card) and `finish_run` (the rest, and
the summary block it prints). Only the main process writes.

    <output_dir>/
      final/            adapter or model, tokenizer (chat template = training template), generation
                        config, run_settings.json, README.md (model card, runs/card.py)   [final-full/: full FT]
      metrics.jsonl     every log event: one row per logging step, evaluation and the end of training (MetricsLog)
      runs/             TensorBoard events (REPORT_TO=tensorboard, the default): tensorboard --logdir <output_dir>/runs
      loss.png          train/eval loss, learning rate(s) and every other logged number against step (runs/plots.py)
      settings.json     the resolved settings, secrets removed
      summary.json      before/after metrics, steps, wall and train time, tokens seen, peak memory, where files went
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from transformers import GenerationConfig, TrainerCallback

from config import Settings, save_settings
from data.chat_templates import chat_template_for
from data.templates import stop_token_ids
from runs.card import is_adapter, result_label
from runs.plots import plot_metrics, read_metrics
from runs.processes import describe_processes, is_main, say
from techniques.checkpoints import replace_dir


class MetricsLog(TrainerCallback):
    """Appends every log event (train steps, evaluations) as one JSON line to `path`, on the main
    process: `{"step": 5, "epoch": 0.38, "loss": 5.92, "learning_rate": 0.0009, ...}`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A resumed run (state loaded at step N > 0) keeps the lines its checkpoint covers;
            # lines an interrupted run logged after its last checkpoint are logged again.
            kept = [line for line in self._lines() if json.loads(line)["step"] <= state.global_step] if state.global_step else []
            self.path.write_text("".join(line + "\n" for line in kept))

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.is_file() else []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def save_final(trainer, tokenizer, settings: Settings, final_dir: str | Path, card: ModelCard | None = None) -> Path:
    """Write the trained model (adapter or full weights), tokenizer, generation config, settings
    and model card (`card`, as README.md; runs.card.model_card) to `final_dir`; call it on every process.

    The tokenizer's chat template becomes the training template (`chat_template_for`, with the run's
    system prompt as its default system turn), so servers that render with the tokenizer prompt
    the model token for token as it learned. The generation config stops on
    every stop id of the template (eos + turn end). Settings are saved without secrets. Weights go
    through `trainer.save_model`, collective under FSDP and ZeRO-3. Everything is written to a
    temporary sibling folder first and renamed into place by the main process once complete, so a
    `final_dir` that exists is whole. DPO's frozen reference adapter ("ref") is not kept.
    """
    final_dir = Path(final_dir)
    partial = final_dir.parent / f".{final_dir.name}.partial"
    tokenizer.chat_template = chat_template_for(settings.prompt_template, tokenizer, settings.system_prompt)
    if is_main():
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(partial))
    if is_main():
        shutil.rmtree(partial / "ref", ignore_errors=True)  # TRL's frozen copy of a re-trained adapter
        save_generation_config(tokenizer, settings, partial)
        save_settings(settings, partial / "run_settings.json")
        if card is not None:
            card.save(partial / "README.md")  # replaces the placeholder card PEFT writes
        replace_dir(partial, final_dir)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def save_generation_config(tokenizer, settings: Settings, folder: str | Path) -> None:
    """A generation config that stops on every stop id of the template (eos + turn end)."""
    GenerationConfig(eos_token_id=stop_token_ids(settings.prompt_template, tokenizer),
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)


def finish_run(trainer, settings: Settings, kind: str, final_dir: str | Path,
               results: dict[str, tuple[float | None, float | None]], started: float, extra: dict | None = None) -> dict:
    """Write settings.json, loss.png and summary.json into the output_dir and print the summary
    block (where everything went, the key numbers, the next commands); returns the summary.

    Call it on every process after `save_final`; only the main process writes and prints.
    Args:
        kind: sft, full or dpo (runs.card.KINDS): what the final folder holds, the next commands.
        results: metric -> (before, after), as for the model card.
        started: `time.perf_counter()` at the start of the run (wall time).
        extra: more JSON-ready entries for summary.json (the example's own figures).
    """
    out = Path(settings.output_dir)
    final_dir = Path(final_dir)
    state = trainer.state
    end = next((e for e in reversed(state.log_history) if "train_runtime" in e), {})
    summary = {
        "kind": kind, "base_model": settings.base_model_name, "output_dir": str(out), "final_dir": str(final_dir),
        "results": {name: {"before": before, "after": after} for name, (before, after) in results.items()},
        "train_loss": end.get("train_loss"), "steps": state.global_step, "epochs": state.epoch,
        "wall_seconds": time.perf_counter() - started, "train_seconds": end.get("train_runtime"),
        "tokens_seen": _tokens_seen(state), "peak_memory": peak_memory(),
        "speed": {key: end.get(f"train_{key}") for key in SPEED_KEYS},
        **describe_processes(trainer), "report_to": settings.report_to, **(extra or {}),
    }
    if not is_main():
        return summary
    save_settings(settings, out / "settings.json")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and any("loss" in row or "eval_loss" in row for row in read_metrics(metrics)):
        title = f"{kind}: {settings.base_model_name} -> {final_dir}"
        plot_metrics(read_metrics(metrics), out / "loss.png", title)
    (out / "summary.json").touch()
    summary["files"] = {path.name: str(path) for path in sorted(out.iterdir()) if not path.name.startswith(".")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    say(summary_block(summary, settings, kind))
    return summary


# The run's speed figures (techniques.throughput): all tokens and supervised tokens per second, MFU,
# and the tokens the run trained on, every process.
SPEED_KEYS = ("tokens_per_s", "supervised_tokens_per_s", "mfu", "tokens", "supervised_tokens")


def _tokens_seen(state) -> int | None:
    """Tokens the model trained on, all processes: TRL's `num_tokens` (non-padding input tokens,
    gathered across processes) in the last training log (the end-of-training one counts every
    step), else the trainer's own count, if kept."""
    counts = [e["num_tokens"] for e in state.log_history if "num_tokens" in e and "eval_loss" not in e]
    return int(counts[-1]) if counts else state.num_input_tokens_seen or None


def peak_memory() -> dict[str, int | None]:
    """Peak memory of this process in bytes: CPU resident set (`ru_maxrss`, KiB on Linux) and, on a
    GPU, the most CUDA memory torch's allocator held for tensors (allocated) and in total (reserved)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return {
        "cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
    }


def summary_block(summary: dict, settings: Settings, kind: str) -> str:
    """The lines printed at the end of a run: files, key numbers, next commands."""
    out, final = summary["output_dir"], summary["final_dir"]
    files = summary.get("files", {})
    what = {"metrics.jsonl": "every logged step and evaluation", "loss.png": "loss, learning rate and logged numbers vs step",
            "summary.json": "these numbers", "settings.json": "resolved settings, no secrets",
            "runs": f"TensorBoard: tensorboard --logdir {Path(out) / 'runs'}",
            Path(final).name: f"{'adapter' if is_adapter(settings, kind) else 'model'}, tokenizer, model card (README.md)"}
    lines = ["", "=== run summary ===", f"output {out}/"]
    lines += [f"  {name + ('/' if Path(path).is_dir() else ''):<15} {what.get(name, '')}".rstrip() for name, path in files.items()]
    width = max([len("training")] + [len(result_label(name)) for name in summary["results"]])
    for name, values in summary["results"].items():
        lines.append(f"{result_label(name):<{width}}  {_fmt(values['before'])} -> {_fmt(values['after'])}")
    memory = summary["peak_memory"]
    peak = (f"{memory['cuda_max_allocated_bytes'] / 2**30:.2f} GiB GPU (allocated)" if memory["cuda_max_allocated_bytes"]
            else f"{memory['cpu_max_rss_bytes'] / 2**30:.2f} GiB CPU (max RSS)")
    tokens = f"{summary['tokens_seen']:,} tokens" if summary["tokens_seen"] else "tokens not counted"
    train_s = summary["train_seconds"]
    lines.append(f"{'training':<{width}}  {summary['steps']} steps, train loss {_fmt(summary['train_loss'])}, "
                 f"{train_s:.0f} s training / {summary['wall_seconds']:.0f} s total, {tokens}, peak {peak}"
                 if train_s is not None else f"{'training':<{width}}  {summary['steps']} steps")
    speed = summary.get("speed") or {}
    if speed.get("supervised_tokens_per_s"):
        mfu = f", MFU {100 * speed['mfu']:.1f}%" if speed.get("mfu") is not None else ""
        lines.append(f"{'speed':<{width}}  {speed['tokens_per_s']:.1f} tokens/s, {speed['supervised_tokens_per_s']:.1f} "
                     f"supervised tokens/s{mfu} ({speed['supervised_tokens']:,} supervised of {speed['tokens']:,} tokens)")
    lines += ["next:", *[f"  {line}" for line in next_commands(final, kind, settings)]]
    return "\n".join(lines)


def next_commands(final_dir: str, kind: str, settings: Settings) -> list[str]:
    """Commands to chat with, merge and export what `final_dir` holds."""
    merged = str(Path(final_dir).parent / "merged")
    if not is_adapter(settings, kind):
        return [f"chat:   python examples/chat.py --model_dir {final_dir}",
                f"export: python examples/export_gguf.py --model_dir {final_dir}   (GGUF for llama.cpp)"]
    return [f"chat:   python examples/chat.py --adapter_dir {final_dir}",
            f"merge:  python examples/merge_adapter.py --adapter_dir {final_dir} --output_dir {merged}",
            f"export: python examples/export_gguf.py --model_dir {merged}   (after merging; GGUF for llama.cpp)"]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return "-" if value is None else str(value)
