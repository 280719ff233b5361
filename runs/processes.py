"""Rank discipline for the example scripts under one or several processes (see runs/__init__.py).

Everything goes through accelerate's `PartialState`, created the way the trainer creates it.
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable

import torch
from accelerate import PartialState

from config import Settings


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
    Python's warnings, which every process would repeat).

    Off a terminal (a log file, CI) the libraries' progress bars (weights loading, dataset maps,
    downloads) are switched off: redrawn bars are noise there, and the trainer prints one line per
    logging step instead (techniques.training.RunLogMixin). PEFT 0.21 and TRL 1.16 (the newest
    releases) still call transformers' deprecated `is_gradient_checkpointing` and
    `gradient_checkpointing_enable`, a FutureWarning on every run about code that is not ours;
    those two are filtered, by their messages (our own code uses the new names).
    """
    main = is_main()
    level = logging.INFO if main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)
    warnings.filterwarnings("ignore", message="`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated",
                            category=FutureWarning)
    if not sys.stderr.isatty():
        import datasets
        import huggingface_hub.utils
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
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
