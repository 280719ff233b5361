"""What every example script does around its trainer, in one home: processes, measuring, saving.

The scripts in examples/ run unchanged as one process (`python examples/x.py`) or as several
(`torchrun --nproc_per_node N`, `accelerate launch`, see configs/accelerate/). Under several
processes this module keeps the rank discipline the scripts rely on, through accelerate's
`PartialState` (no distributed code of our own):

- only the main process prints (`say`) and logs at INFO (`setup_logging`); the others warn only;
- the model folder is resolved (and converted or fetched, the first time) on the local main
  process first, so the others find it in the cache (`resolve_model_once`);
- the dataset is built once per machine by its local main process and shared with the others
  (`prepare_once`), so the dataset report is printed once and nothing is tokenized N times;
- held-out answers are generated on the main process, or skipped with the reason when the
  weights are sharded (FSDP, ZeRO-3) (`held_out_answers`);
- the final folder is written through the trainer's collective `save_model` (FSDP full state
  dicts and ZeRO-3 gather their shards there) into a temporary folder that the main process
  renames into place once complete (`save_final`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable

import torch
from accelerate import PartialState
from transformers import GenerationConfig, TrainerCallback

from config import Settings, save_settings
from data.dataset import chat_template_for, held_out_prompt, load_splits, stop_token_ids
from inference import generate_replies

log = logging.getLogger("runs")

# ---------------------------------------------------------------- processes


def process_state() -> PartialState:
    """accelerate's view of the processes, created the way the trainer creates it (`cpu=True`
    without CUDA: gloo under torchrun), so that both agree from the first line of a script on."""
    return PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    """True on the main process (always, without a launcher)."""
    return process_state().is_main_process


def say(*lines: str) -> None:
    """Print on the main process only, so N processes do not interleave N copies of every line."""
    if is_main():
        print(*lines, sep="\n", flush=True)


def setup_logging() -> None:
    """INFO logging on the main process; the others log errors and their own warnings only (not
    Python's warnings, which every process would repeat)."""
    main = is_main()
    level = logging.INFO if main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)
    if not main:
        warnings.simplefilter("ignore")


@contextmanager
def local_main_first():
    """Run the block on each machine's local main process first, then on the others."""
    with process_state().local_main_process_first():
        yield


def resolve_model_once(settings: Settings) -> str:
    """`models.resolve_model_path`, run by each machine's main process before the others: a first
    run converts or fetches the model once per machine, and the others find it in the cache."""
    from models import resolve_model_path

    with local_main_first():
        return resolve_model_path(settings)


def prepare_once(build: Callable[[], tuple], settings: Settings, name: str) -> tuple:
    """`build()` -> (DatasetDict, report) on each machine's local main process only.

    Under several processes the local main builds and saves the splits (`save_to_disk` under
    `<output_dir>/.prepared/`), the other processes of the machine load them into memory, and the
    folder is removed; they get `report=None` (only the main process prints it). One process: just
    `build()`. An error in `build()` ends the main process, and the launcher (torchrun,
    accelerate) then stops the others.
    """
    state = process_state()
    if state.num_processes == 1:
        return build()
    import datasets

    folder = Path(settings.output_dir) / ".prepared" / f"{name}-node{state.process_index - state.local_process_index}"
    with state.local_main_process_first():
        if state.is_local_main_process:
            data, report = build()
            shutil.rmtree(folder, ignore_errors=True)
            data.save_to_disk(str(folder))
        else:
            data, report = datasets.load_from_disk(str(folder), keep_in_memory=True), None
    state.wait_for_everyone()
    if state.is_local_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        with suppress(OSError):  # another machine's folder may still be there
            folder.parent.rmdir()
    return data, report


def describe_processes(trainer) -> dict:
    """How the run is distributed: process count, backend, and the class that wraps the model for
    training (DistributedDataParallel, FSDP, DeepSpeedEngine; the model's own class when alone)."""
    state = trainer.accelerator.state
    return {
        "processes": trainer.accelerator.num_processes,
        "distributed_type": str(state.distributed_type).rsplit(".", 1)[-1],
        "backend": getattr(state, "backend", None),
        "model_wrapper": type(trainer.model_wrapped).__name__,
    }


def sharded_weights(trainer) -> str | None:
    """Why one process cannot run the model alone (FSDP or ZeRO-3 shard its weights), or None."""
    if trainer.is_fsdp_enabled:
        return "FSDP shards the weights across processes"
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3 partitions the weights across processes"
    return None


# ---------------------------------------------------------------- measuring


def held_out_prompts(settings: Settings, n: int) -> list[list[dict]]:
    """The first `n` eval conversations, cut before their last assistant turn."""
    return [held_out_prompt(messages)[0] for messages in load_splits(settings).get("eval", [])[:n]]


def held_out_answers(model, tokenizer, held_out: list[list[dict]], template: str, trainer=None) -> list[str] | str:
    """Greedy answers to `held_out`, generated on the main process alone (the others get []).

    Pass the `trainer` after training: when it has sharded the weights (FSDP, ZeRO-3) no single
    process holds the model, and the reason is returned instead of answers.
    """
    reason = sharded_weights(trainer) if trainer is not None else None
    if reason:
        return f"held-out answers skipped: {reason}; chat with the saved folder instead (examples/chat.py)"
    if not held_out or not is_main():
        return []
    return generate_replies(model, tokenizer, held_out, template)


def first_eval(trainer) -> dict:
    """The metrics of the evaluation before the first step (`eval_on_start`), or {}."""
    return next((e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == 0), {})


class OnFirstEvaluate(TrainerCallback):
    """Calls `report(metrics)` once, with the metrics of the evaluation that `eval_on_start=True`
    runs inside `train()` before the first step (the "before training" figures)."""

    def __init__(self, report: Callable[[dict], None]):
        self.report, self.done = report, False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.done and state.global_step == 0:
            self.done = True
            self.report(dict(metrics or {}))


class MetricsLog(TrainerCallback):
    """Appends every log event (train steps, evaluations) as one JSON line to `path`, on the main
    process: `{"step": 5, "epoch": 0.38, "loss": 5.92, "learning_rate": 0.0009, ...}`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


# ---------------------------------------------------------------- saving


def save_final(trainer, tokenizer, settings: Settings, final_dir: str | Path) -> Path:
    """Write the trained model (adapter or full weights), tokenizer, generation config and settings
    to `final_dir`; call it on every process.

    The tokenizer's chat template becomes the training template (`chat_template_for`), so servers
    that render with the tokenizer prompt the model as it learned. The generation config stops on
    every stop id of the template (eos + turn end). Settings are saved without secrets. Weights go
    through `trainer.save_model`, collective under FSDP and ZeRO-3. Everything is written to a
    temporary sibling folder first and renamed into place by the main process once complete, so a
    `final_dir` that exists is whole. DPO's frozen reference adapter ("ref") is not kept.
    """
    final_dir = Path(final_dir)
    partial = final_dir.parent / f".{final_dir.name}.partial"
    tokenizer.chat_template = chat_template_for(settings.prompt_template, tokenizer)
    if is_main():
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(partial))
    if is_main():
        shutil.rmtree(partial / "ref", ignore_errors=True)  # TRL's frozen copy of a re-trained adapter
        save_generation_config(tokenizer, settings, partial)
        save_settings(settings, partial / "run_settings.json")
        _replace_dir(partial, final_dir)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def save_generation_config(tokenizer, settings: Settings, folder: str | Path) -> None:
    """A generation config that stops on every stop id of the template (eos + turn end)."""
    GenerationConfig(eos_token_id=stop_token_ids(settings.prompt_template, tokenizer),
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing an older `target` (renamed away first, then removed)."""
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
