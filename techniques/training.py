"""What the SFT and DPO trainers share: their `TrainingArguments`, their logs, and an evaluation that is exact.

`trainer_arguments(settings)` gives the keywords both configs start from. `RunLogMixin` decides
what a run prints and logs (see its docstring). `ExactEvalMixin` goes in front of a
transformers/TRL trainer class (`class Trainer(RunLogMixin, ExactEvalMixin, SFTTrainer)`) and makes
two promises the stock trainers do not keep:

1. Eval figures do not depend on the eval batch size or the number of processes. The stock loop
   averages per-batch means with equal weights (the last, smaller batch counts as much as a full
   one: on tests/test_eval.py's data 5.963 is the token mean, 5.925 the stock figure at eval batch
   4), and under N processes the sampler pads the last batch with repeated examples that are
   counted too. Here every process evaluates
   the whole eval set in order (so nothing is repeated and every process holds the same figures;
   the cost is N times the eval compute of a sharded eval, small next to training for eval sets of
   hundreds or thousands of examples), and each batch's means are weighted by what they average:
   `eval_weight(inputs)` is the number of supervised tokens for SFT (so eval loss is the mean token
   cross-entropy over the set, perplexity its exp) and the number of pairs for DPO.
2. Training after `evaluate()` still synchronises the ranks. A pre-training `evaluate()` prepares
   the model for evaluation without DistributedDataParallel, and `train()` then never wraps it:
   each rank trains its own copy, silently. Evaluate before training with `eval_on_start=True`
   (inside `train()`, after wrapping), as the example scripts do; `train()` refuses the broken
   state with a message saying so.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate.utils import parse_flag_from_env
from torch.utils.data import DataLoader
from transformers import PrinterCallback, ProgressCallback
from transformers.integrations import TensorBoardCallback
from transformers.integrations.integration_utils import default_logdir

from config import Settings, resolve_precision


def trainer_arguments(settings: Settings) -> dict:
    """`TrainingArguments` keywords shared by every trainer here (SFT, DPO), from the settings.

    TRL's defaults that would surprise are set explicitly: `bf16` (TRL defaults to True) follows
    `resolve_precision` (bf16 on a CPU with native bf16, else fp32), activation checkpointing (TRL defaults to on) follows
    GRADIENT_CHECKPOINTING under transformers' current name `activation_checkpointing` (5.23+; the
    old `gradient_checkpointing` keyword is a deprecated alias that warns), `use_cpu` is set on a
    machine without CUDA (TRL refuses to start otherwise). `report_to` is REPORT_TO (TensorBoard
    writes to <output_dir>/runs/<date>_<host>). Progress bars only on a terminal (`disable_tqdm`
    otherwise: a log file or CI gets one line per logging step, `RunLogMixin`). Steps set to 0 mean
    "never" (eval, save). A NaN
    or infinite loss is logged as such (`logging_nan_inf_filter=False`), never masked.

    Raises ValueError when an accelerate config asks for FSDP or DeepSpeed on a machine without
    CUDA (accelerate would ignore FSDP there without a word), or for another mixed precision than
    MIXED_PRECISION resolves to (transformers would silently take the launcher's): the configs in
    configs/accelerate/ say `mixed_precision: 'no'`, which defers to the setting.
    """
    for flag, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if parse_flag_from_env(flag) and not torch.cuda.is_available():
            # accelerate would silently drop FSDP on a CPU and train unsharded
            raise ValueError(f"the accelerate config asks for {what}, which needs CUDA GPUs; on a CPU machine launch "
                             "DDP with `torchrun --nproc_per_node N examples/<script>.py` instead")
    precision = resolve_precision(settings)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched not in ("no", precision):
        raise ValueError(
            f"the accelerate config launches with mixed_precision={launched}, but MIXED_PRECISION={settings.mixed_precision} "
            f"resolves to {precision} here: set MIXED_PRECISION={launched}, or mixed_precision: 'no' in the "
            "accelerate config (which then follows MIXED_PRECISION)"
        )
    eval_steps = settings.eval_steps or None
    return dict(
        output_dir=settings.output_dir,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        per_device_eval_batch_size=settings.per_device_eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        warmup_steps=settings.warmup_steps,
        lr_scheduler_type=settings.lr_scheduler_type,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        save_total_limit=settings.save_total_limit,  # applied by techniques.checkpoints' rotation
        # A non-finite step loss is logged as it is (transformers would log the mean of earlier
        # steps instead, 0.0 right after a log); runs.guards stops the run on it.
        logging_nan_inf_filter=False,
        activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        report_to="none" if settings.report_to == ["none"] else list(settings.report_to),
        disable_tqdm=not sys.stderr.isatty(),
        dataloader_num_workers=0,
        # Every trainable weight gets a gradient each step (LoRA, full, DPO); searching the graph
        # for unused ones costs time every step and DDP warns about it.
        ddp_find_unused_parameters=False,
    )


class RunLogMixin:
    """What a trainer prints and logs, the same for SFT and DPO; put it first in the bases.

    - Every log event (a logging step, an evaluation, the end of training) prints one line
      (`format_log_line`), on the main process, under the progress bars on a terminal and
      without bars in a log file or CI. It replaces transformers' printers, which print the raw dict.
    - A training log gets the learning rate of every named optimizer group (the LLRD groups of
      techniques.full_finetune: `learning_rate/head`, `learning_rate/model.layers.3`, ...), see
      `group_learning_rates`; grad norm, loss and the trainer's own numbers (TRL's DPO rewards and
      margins, token counts) are already there.

    - TensorBoard writes into <output_dir>/runs/<date>_<host> from the first event on, evaluations
      before or without training included.

    Whatever a trainer puts in the dict it passes to `log()` reaches every REPORT_TO tracker,
    metrics.jsonl (runs.outputs.MetricsLog) and loss.png: a new per-step number (tokens/s, memory)
    added to `logs` before `super().log(logs)` needs nothing else.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self.add_callback(StepLines(bars=not self.args.disable_tqdm))
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                # transformers picks <output_dir>/runs/<date>_<host> when training begins; an evaluate()
                # before or without train() would write its events to ./runs of the working directory.
                callback.logging_dir = os.path.join(self.args.output_dir, default_logdir())

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and "learning_rate" in logs and self.optimizer is not None:
            logs.update(group_learning_rates(self.optimizer.param_groups, logs["learning_rate"]))
        super().log(logs, start_time)


def group_learning_rates(param_groups: list[dict], logged_lr: float) -> dict[str, float]:
    """`{"learning_rate/<where>": lr}` for each optimizer group with a `name` ("<where> decay" /
    "<where> no_decay", techniques.full_finetune.llrd_param_groups); {} when no group is named.

    `logged_lr` is the LR the trainer logs: group 0's during the step just taken (transformers
    reads it before the scheduler steps). Group g's is `logged_lr * initial_lr_g / initial_lr_0`:
    transformers' schedulers scale every group by one factor, and at log time the groups already
    hold the next step's LR. Groups that share a `<where>` (decay and no_decay) share their LR.
    """
    named = [group for group in param_groups if group.get("name")]
    if not named:
        return {}
    first = param_groups[0].get("initial_lr", param_groups[0]["lr"])
    rates = {}
    for group in named:
        where = group["name"].rsplit(" ", 1)[0] if group["name"].endswith(("decay", "no_decay")) else group["name"]
        scale = group.get("initial_lr", group["lr"]) / first if first else 1.0
        rates.setdefault(f"learning_rate/{where}", logged_lr * scale)
    return rates


def format_log_line(logs: dict, step: int, max_steps: int) -> str:
    """One log event as one line: `step 5/39 | loss 5.921 | grad_norm 0.252 | learning_rate 0.001 | ...`.

    Numbers as `format_number` writes them; per-group learning rates (`learning_rate/...`,
    possibly dozens with LLRD) are left to metrics.jsonl, the trackers and loss.png.
    """
    parts = [f"step {step}/{max_steps}"]
    for key, value in logs.items():
        if key.startswith("learning_rate/") or key == "total_flos":
            continue
        parts.append(f"{key} {format_number(value)}")
    return " | ".join(parts)


def format_number(value) -> str:
    """A logged number for a reader: counts (ints, and whole floats such as TRL's `num_tokens`)
    with thousands separators, `10,316`; other floats with 4 significant digits, `5.959`,
    `9.549e-05`, and from 10,000 up as whole numbers, `14,254` (`.4g` would write `1.425e+04`).
    Anything else (None, a bool, a string) as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


class StepLines(ProgressCallback):
    """transformers' progress bars (training, evaluation) when `bars`, and one `format_log_line`
    per log event either way, on the main process: written above the bar on a terminal, printed
    plainly in a log file or CI, where redrawn bars would be noise."""

    def __init__(self, bars: bool):
        super().__init__()
        self.bars = bars

    def on_train_begin(self, args, state, control, **kwargs):
        if self.bars:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bars:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bars:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = format_log_line(logs, state.global_step, state.max_steps)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


class ExactEvalMixin:
    """Exact eval figures and a DDP-safe `train()`; see the module docstring.

    A subclass defines `eval_weight(inputs) -> int`: how many items (tokens, pairs) one eval batch's
    means average over. Put the mixin first in the bases so its methods wrap the trainer's own.
    """

    def eval_weight(self, inputs: dict) -> int:
        raise NotImplementedError

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        # Not `accelerator.prepare`d: each process reads the whole set in order, so no process
        # evaluates an example twice and collectives inside the model see equal batch counts.
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        dataset = self._remove_unused_columns(dataset, description="evaluation")
        return DataLoader(
            dataset, batch_size=self.args.eval_batch_size, shuffle=False, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        weight = self.eval_weight(inputs)
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        self._eval_weights.append(weight)
        self._eval_loss_sum += loss.item() * weight
        return loss, logits, labels

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_weights, self._eval_loss_sum = [], 0.0
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        total = sum(self._eval_weights)
        output.metrics[f"{metric_key_prefix}_loss"] = self._eval_loss_sum / total if total else float("nan")
        output.metrics[f"{metric_key_prefix}_weight"] = total  # tokens (SFT) or pairs (DPO) the figures cover
        return output

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # TRL keeps one value per eval batch in self._metrics["eval"] and averages them with equal
        # weights in its own log(); weight each by its batch's share instead.
        weights = getattr(self, "_eval_weights", None)
        if weights and not self.model.training and sum(weights):
            for name, values in self._metrics["eval"].items():
                if len(values) == len(weights):
                    values[:] = [sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)]
            self._eval_weights = []
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        if (self.accelerator.num_processes > 1 and self.model_wrapped is self.model
                and getattr(self.model, "_is_accelerate_prepared", False)):
            # accelerate marks a model prepared for evaluation as prepared, and then never wraps it
            # for training: the ranks would not average their gradients.
            raise RuntimeError(
                f"trainer.evaluate() ran before trainer.train() under {self.accelerator.num_processes} processes: "
                "the model was prepared for evaluation without DistributedDataParallel, so the ranks would train "
                "separate copies. Evaluate before training with eval_on_start=True instead (the example scripts do)."
            )
        return super().train(*args, **kwargs)
