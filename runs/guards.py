"""What keeps a run from losing work or saving garbage: checks before anything loads, the resume
point, and two callbacks that stop training cleanly (a signal, a diverged step).

`RunGuard(settings, script, argv)` is called by each example first, before any model loads:

- the output dir must be a writable folder, and one that already holds a run (a `final*/`
  folder or checkpoints) is refused unless `overwrite_output_dir` (its checkpoints are then
  deleted now, its final folder replaced at the end) or `resume_from_checkpoint` is set;
- `resume_from_checkpoint`: `auto` = the latest complete checkpoint of the output dir (a fresh
  start when there is none yet, so a preemptible job can always be relaunched with the same
  command), or a checkpoint folder, which must be complete (`techniques.checkpoints`);
- the precision must be possible on this machine (fp16 without a GPU is refused here, not after loading).

Its `callbacks` go to the trainer:

- `StopOnSignal`: SIGINT (Ctrl-C) or SIGTERM (what schedulers and spot VMs send) during training
  saves a checkpoint at the end of the current optimizer step and stops; every process stops at
  the same step (the flag is reduced over processes at each step end). `raise_if_stopped` then
  raises `Interrupted` (exit status 128 + signal number) whose message is the exact resume command.
- `StopOnDivergence`: before each optimizer step, a non-finite gradient norm (what a NaN or
  infinite loss produces) drops the step's gradients, so the update is never applied, and stops
  training without saving; a non-finite logged loss stops it too. `raise_if_stopped` raises
  `Diverged` naming the step, the value and the last good checkpoint, and the example never
  reaches its final save. Under fp16 mixed precision the gradient check is off (the loss
  scaler skips overflowing steps by design) and the loss check remains; under DeepSpeed the
  gradients are not on the parameters, so only the loss check applies. The loss check alone
  comes after the bad update (and its checkpoint): only checkpoints before the last finite loss
  count as good, and the message names the later ones.

Only the main process prints; every process runs the same checks, so all raise the same error.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from config import SECRET_FIELDS, Settings, check_kernels, resolve_precision
from runs.processes import is_main, process_state, say
from techniques.checkpoints import (STAGING_DIR, checkpoint_step, complete_checkpoints, incomplete_checkpoints,
                                   is_complete_checkpoint)

FINAL_DIRS = ("final", "final-full")  # what the examples save at the end (LoRA / DPO, full fine-tuning)


class RunSetupError(ValueError):
    """The run cannot start as asked (output dir, resume point); the message says what to change."""


class RunStopped(Exception):
    """Training stopped before its end (`Interrupted`, `Diverged`); `exit_code` is the script's exit status."""

    exit_code = 1


class Interrupted(RunStopped):
    """A signal stopped training after a checkpoint was saved; the message gives the resume command."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class Diverged(RunStopped):
    """A non-finite loss or gradient norm stopped training; nothing was saved as final."""


class RunGuard:
    """The checks and callbacks of one run (module docstring). Create it before loading any model.

    Args:
        settings: the run's settings (output_dir, resume_from_checkpoint, overwrite_output_dir,
            mixed_precision).
        script: the example's file, for the resume command.
        argv: the flags the script was given (None = `sys.argv[1:]`), for the resume command.
    Attributes:
        resume_from: the checkpoint folder to pass to `trainer.train(resume_from_checkpoint=...)`, or None.
        callbacks: `[StopOnSignal, StopOnDivergence]` for the trainer.
    Raises:
        RunSetupError: the output dir is a file, not writable, or holds a run that may not be
            replaced; the resume point does not exist or is incomplete.
        ValueError: the precision or kernels are impossible here (`config.resolve_precision`,
            `config.check_kernels`).
    """

    def __init__(self, settings: Settings, script: str | Path, argv: list[str] | None = None):
        self.settings = settings
        resolve_precision(settings, warn=False)
        check_kernels(settings)
        check_output_dir(settings)
        self.resume_from = resolve_resume(settings)
        self.signals = StopOnSignal()
        self.divergence = StopOnDivergence()
        self.callbacks = [self.signals, self.divergence]
        self.command = resume_command(script, sys.argv[1:] if argv is None else list(argv))

    def raise_if_stopped(self, trainer) -> None:
        """After `trainer.train()`: raise `Diverged` or `Interrupted` when a callback stopped it
        (not for a signal during the last step: training is complete, the example saves as usual)."""
        output_dir = Path(self.settings.output_dir)
        if self.divergence.step is not None:
            last = self.divergence.good_checkpoints(output_dir, trainer.state.log_history)
            broken = [p.name for p in complete_checkpoints(output_dir) if p not in last]
            good = (f"last good checkpoint: {last[-1]} (resume from it with a lower learning rate: "
                    f"{self.command(last[-1])} --learning_rate ...)" if last
                    else "no checkpoint was saved before it (SAVE_STEPS=N keeps one every N steps)")
            good += f"\nsaved after the last finite loss, so not good: {', '.join(broken)}" if broken else ""
            skipped = "The step was not applied and nothing" if self.divergence.grad_norm is not None else "Nothing"
            raise Diverged(f"training diverged at step {self.divergence.step}: {self.divergence.describe()}. "
                           f"{skipped} was saved as final.\n{good}")
        if self.signals.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
            # (a signal during the last step: training is complete, so the final folder is still written)
            name = signal.Signals(self.signals.signum).name
            checkpoint = output_dir / f"checkpoint-{self.signals.stopped_at}"
            raise Interrupted(f"{name} at step {self.signals.stopped_at}: saved a resumable checkpoint to {checkpoint}. "
                              f"Resume with (same environment and .env):\n  {self.command(checkpoint)}",
                              self.signals.signum)


# ---------------------------------------------------------------- before anything loads


def check_output_dir(settings: Settings) -> None:
    """Refuse an output dir that is a file, is not writable, or already holds a run; see `RunGuard`.

    With `overwrite_output_dir` (and no resume) the earlier run's checkpoints and metrics.jsonl are
    deleted here, by the main process, so they cannot mix with the new run's; its final folder stays
    until the new one replaces it. Raises RunSetupError.
    """
    out = Path(settings.output_dir).expanduser()
    where = f"OUTPUT_DIR={settings.output_dir}"
    if out.exists() and not out.is_dir():
        raise RunSetupError(f"{where} is a file, not a folder: choose a folder for the run's checkpoints and final model")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunSetupError(f"{where} is not writable ({err.strerror or err}): choose a folder you can write to") from None
    finals = [name for name in FINAL_DIRS if (out / name).is_dir()]
    checkpoints = [p.name for p in complete_checkpoints(out) + incomplete_checkpoints(out)]
    if not (finals or checkpoints):
        return
    if settings.resume_from_checkpoint and settings.overwrite_output_dir:
        raise RunSetupError("RESUME_FROM_CHECKPOINT and OVERWRITE_OUTPUT_DIR=true contradict each other: "
                            "set one (continue the earlier run, or start over)")
    if settings.resume_from_checkpoint:
        return
    held = (f"a finished run ({', '.join(f + '/' for f in finals)})" if finals
            else f"checkpoints of an unfinished run ({', '.join(checkpoints[-3:])})")
    if not settings.overwrite_output_dir:
        raise RunSetupError(
            f"{where} already holds {held}. Continue it with RESUME_FROM_CHECKPOINT=auto, start over with "
            "OVERWRITE_OUTPUT_DIR=true (deletes its checkpoints, replaces its final folder at the end), "
            "or choose another OUTPUT_DIR")
    process_state().wait_for_everyone()  # every process has looked before anything is deleted
    if is_main():
        say(f"overwrite_output_dir: deleting the earlier run's checkpoints in {out} ({len(checkpoints)})")
        for name in checkpoints + [STAGING_DIR]:
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    process_state().wait_for_everyone()


def resolve_resume(settings: Settings) -> str | None:
    """The checkpoint folder to resume from, or None for a fresh start (see `RunGuard`). Raises RunSetupError."""
    value = settings.resume_from_checkpoint
    if not value:
        return None
    out = Path(settings.output_dir).expanduser()
    if value == "auto":
        skipped = incomplete_checkpoints(out)
        if skipped:
            say(f"resume: skipping incomplete {', '.join(p.name for p in skipped)} (a save cut short)")
        found = complete_checkpoints(out)
        if found:
            say(f"resume: continuing from {found[-1]}, the latest complete checkpoint")
            return str(found[-1])
        finals = [name for name in FINAL_DIRS if (out / name).is_dir()]
        if finals:
            raise RunSetupError(f"RESUME_FROM_CHECKPOINT=auto: OUTPUT_DIR={settings.output_dir} holds a finished run "
                                f"({', '.join(finals)}/) and no checkpoint to continue from; start over with "
                                "OVERWRITE_OUTPUT_DIR=true or choose another OUTPUT_DIR")
        say(f"resume: no checkpoint in {out} yet, starting fresh")
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise RunSetupError(f"RESUME_FROM_CHECKPOINT={value}: no such folder (give a checkpoint-N folder, or auto)")
    if not is_complete_checkpoint(path):
        found = complete_checkpoints(path.parent)
        hint = f"complete ones there: {', '.join(p.name for p in found)}" if found else "there is no complete one beside it"
        raise RunSetupError(f"RESUME_FROM_CHECKPOINT={value} is not a complete checkpoint (a checkpoint-N folder whose "
                            f"trainer_state.json is at step N; a save cut short leaves none); {hint}, or use auto")
    say(f"resume: continuing from {path}")
    return str(path)


def resume_command(script: str | Path, argv: list[str]):
    """`checkpoint -> the command line that resumes this run from it`: the script and its flags as
    given, with `--resume_from_checkpoint <checkpoint>` in place of any earlier one, secrets left
    out (they come from the environment again), under the launcher that started it."""
    skip = {f"--{name}" for name in ("resume_from_checkpoint", *SECRET_FIELDS)}
    skip |= {flag.replace("_", "-") for flag in skip}
    kept, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in skip:
            i += 1 if "=" in argv[i] else 2
            continue
        kept.append(argv[i])
        i += 1
    try:
        shown = Path(script).resolve().relative_to(Path.cwd())
    except ValueError:
        shown = Path(script).resolve()
    launcher = ["python"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = (["accelerate", "launch", "--config_file", "<the same config>"]
                    if "ACCELERATE_MIXED_PRECISION" in os.environ  # set by `accelerate launch` for its workers
                    else ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])])
    return lambda checkpoint: shlex.join([*launcher, str(shown), *kept, "--resume_from_checkpoint", str(checkpoint)])


# ---------------------------------------------------------------- during training


def _max_over_processes(value: float) -> float:
    """`value` reduced with max over every process (itself alone without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    if torch.distributed.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=process_state().device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.item()


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM during `train()`: checkpoint at the end of the step, then stop (see module doc).

    The handlers are installed at the start of training and the previous ones restored at its end,
    so outside `train()` Ctrl-C behaves as usual. A second signal does not kill the run while the
    checkpoint is written (torchrun forwards the terminal's SIGINT, so each process gets two);
    Ctrl-\\ (SIGQUIT) or kill -9 stop it at once and lose the steps since the last checkpoint.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int = 0  # the signal received (agreed over processes once acted on)
        self.stopped_at: int | None = None  # the step whose checkpoint was saved
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if not self.signum and is_main():
            name = signal.Signals(signum).name
            os.write(2, f"\n{name} received: saving a checkpoint at the end of this step, then stopping\n".encode())
        self.signum = self.signum or signum

    def on_train_begin(self, args, state, control, **kwargs):
        if self._previous or not _in_main_thread():
            return
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        received = int(_max_over_processes(float(self.signum)))  # every process stops at this same step
        if received:
            self.signum, self.stopped_at = received, state.global_step
            control.should_save, control.should_training_stop, control.should_evaluate = True, True, False

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class StopOnDivergence(TrainerCallback):
    """Stop at the first non-finite gradient norm (before the optimizer applies it) or logged loss."""

    def __init__(self):
        self.step: int | None = None  # the optimizer step that diverged (1-based, as logged)
        self.grad_norm: float | None = None
        self.loss: float | None = None

    def describe(self) -> str:
        parts = [f"gradient norm {self.grad_norm}"] if self.grad_norm is not None else []
        parts += [f"loss {self.loss}"] if self.loss is not None else []
        return " and ".join(parts) + " (not finite)"

    def good_checkpoints(self, output_dir: Path, log_history: list[dict]) -> list[Path]:
        """The complete checkpoints whose weights a finite loss was computed with. The gradient check
        drops the bad update, so every checkpoint before it is good. The loss check alone (gradient
        check off) sees a loss computed with the weights of earlier steps, whose updates (and
        checkpoints) were applied already: only checkpoints before the last finite loss logged are good."""
        checkpoints = complete_checkpoints(output_dir)
        if self.grad_norm is not None:
            return checkpoints
        finite = max((e["step"] for e in log_history if "loss" in e and math.isfinite(e["loss"])), default=0)
        return [p for p in checkpoints if checkpoint_step(p) < finite]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this process's shards
        norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
        if _max_over_processes(0.0 if math.isfinite(norm) else 1.0):
            for param in model.parameters():
                param.grad = None  # the optimizer skips parameters without a gradient: no update applied
            self.step, self.grad_norm = state.global_step + 1, norm
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.step is not None:
            control.should_save, control.should_evaluate = False, False
            control.should_log = True  # so the step's loss is logged (and reaches on_log)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(loss):
            return
        self.loss = loss
        if self.step is None:  # the gradient check was off (fp16, DeepSpeed): the update is applied already
            self.step = state.global_step
            control.should_training_stop, control.should_save, control.should_evaluate = True, False, False
