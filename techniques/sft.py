"""Supervised fine-tuning trainer (TRL `SFTTrainer`) shared by the LoRA, QLoRA and full recipes.

The dataset arrives already tokenized with `labels` (see `data.examples.build_sft_example`), so
TRL uses our loss masks as they are: its own chat-template and truncation handling stay off.
"""

from __future__ import annotations

import math

import torch
from datasets import DatasetDict
from transformers import PreTrainedModel
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTConfig, SFTTrainer

from config import Settings, check_kernels
from techniques.checkpoints import AtomicCheckpointsMixin
from techniques.head_loss import SupervisedHeadLossMixin
from techniques.qlora import adapter_dtype_kept
from techniques.throughput import ThroughputMixin
from techniques.training import ExactEvalMixin, RunLogMixin, trainer_arguments


def sft_config(settings: Settings, **overrides) -> SFTConfig:
    """TRL `SFTConfig`: `trainer_arguments` plus SFT's own keywords; `overrides` win over everything.

    `max_length=None` without packing because examples were already truncated by our documented
    rule (`data.examples.build_sft_example`).

    Padding-free batches (`settings.padding_free`, the default, and always with packing): TRL's
    padding-free collator concatenates each batch into one row with `position_ids` restarting at 0
    per example, no `attention_mask`, and label -100 on each example's first token. The default
    attention, `sdpa_varlen` (attention.py), reads the example bounds from those position ids and
    runs sdpa once per example; with plain sdpa or eager attention transformers builds one dense
    block-diagonal causal mask over the row instead (flash attention reads the bounds too), so in
    every case no token sees another example.

    Packing (`settings.packing`): TRL packs the train examples best-fit-decreasing into rows of
    max_seq_length tokens (`max_length`, which then only sizes rows: no example is longer), and a
    batch of such rows goes through the same collator. Eval is not packed (`eval_packing=False`):
    its batches hold the same examples as without packing. tests/test_packing.py checks all of this.

    Worked example, examples a (3 tokens) and b (5 tokens) in one packed row:

        input_ids:    a0    a1  a2  b0    b1  b2  b3  b4
        position_ids: 0     1   2   0     1   2   3   4      (no attention_mask)
        labels:       -100  a1  a2  -100  b1  b2  b3  b4     (b0 is never a target of a2)
        attention:    a* see only a*, b* see only b* (causal within each)
    """
    check_kernels(settings)
    args = trainer_arguments(settings)
    args.update(
        max_length=settings.max_seq_length if settings.packing else None,
        packing=settings.packing,
        padding_free=settings.padding_free or settings.packing,  # TRL's bfd packing is always padding-free
        packing_strategy="bfd",  # whole examples only; "wrapped" would cut them across rows
        eval_packing=False,
        # Length-grouped batches pad less when padded (bench/: 1.49x on the Alpaca demo); padding-free
        # batches and packed rows have no padding to save.
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        # transformers patches Liger's kernels into the model (its `use_liger_kernel`); our head
        # loss still selects the supervised rows before the LM head.
        use_liger_kernel=settings.use_liger_kernel,
    )
    args.update(overrides)
    return SFTConfig(**args)


class Trainer(AtomicCheckpointsMixin, RunLogMixin, ThroughputMixin, ExactEvalMixin, SupervisedHeadLossMixin, SFTTrainer):
    """TRL's `SFTTrainer` with the LM head on supervised positions only (`techniques.head_loss`),
    exact eval figures and DDP-safe training (`techniques.training`),
    speed figures in every log (`techniques.throughput`), checkpoints written whole or not at all
    (`techniques.checkpoints`), and optionally an optimizer built by `optimizer_factory(model)`
    when the trainer needs one.

    The factory is how full fine-tuning hands its LLRD parameter groups over: the trainer calls it
    at the point where it would build its own AdamW (before FSDP2 shards the parameters, which
    accelerate then swaps into the optimizer's groups; inside `deepspeed_init` for ZeRO), so it
    works where a pre-built optimizer is refused (FSDP).
    """

    def __init__(self, *args, optimizer_factory=None, peak_flops=None, **kwargs):
        self.optimizer_factory, self.peak_flops_setting = optimizer_factory, peak_flops
        super().__init__(*args, **kwargs)

    def eval_weight(self, inputs: dict) -> int:
        """Supervised tokens in the batch: targets of the next-token loss (labels[:, 1:] != -100)."""
        return int((inputs["labels"][:, 1:] != -100).sum())

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, seed=seed)
        return sampler

    def create_optimizer(self, model=None):
        if self.optimizer_factory is None or self.optimizer is not None:
            return super().create_optimizer(model)
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            # FSDP1 builds the optimizer after wrapping, over flattened parameters with new names,
            # where the decoder layers cannot be found; FSDP2 keeps them (see the class docstring).
            raise ValueError("full fine-tuning with LLRD groups needs FSDP2 (fsdp_version: 2, "
                             "configs/accelerate/fsdp2.yaml), DDP or DeepSpeed ZeRO; FSDP1 is not supported")
        self.optimizer = self.optimizer_factory(self.accelerator.unwrap_model(self.model if model is None else model))
        return self.optimizer


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' `LengthGroupedSampler` whose order in epoch e depends on `seed + e` alone.

    The stock sampler draws from the global torch RNG when an epoch starts. A run resumed inside
    epoch e restores the RNG state of its checkpoint step, not of the epoch's start, so it would
    draw a different order and train other batches than the uninterrupted run (tests/test_resume.py);
    under N processes every rank must draw the same order too. accelerate's `RandomSampler`
    replacement (`SeedableRandomSampler`) solves the same problem the same way; the trainer and
    accelerate call `set_epoch` before each epoch's iteration.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def build_sft_trainer(
    model: PreTrainedModel,
    tokenizer,
    datasets: DatasetDict,
    settings: Settings,
    optimizers=None,
    optimizer_factory=None,
    callbacks=None,
    **config_overrides,
) -> Trainer:
    """A `Trainer` (TRL `SFTTrainer`, exact eval) over `datasets["train"]` (and `datasets["eval"]`).

    Args:
        model: the model to train (a PeftModel for LoRA/QLoRA; a plain model for full fine-tuning).
        tokenizer: passed as `processing_class`; it is saved with checkpoints.
        datasets: splits with `input_ids` and `labels` columns (lists of int).
        optimizers: `(optimizer, scheduler)` passed to the trainer as is (either may be None: the
            trainer builds that one from the settings); refused by transformers under FSDP.
        optimizer_factory: `model -> optimizer`, called when the trainer creates its optimizer
            (full fine-tuning passes `lambda m: build_optimizer(m, settings)`); works under FSDP2.
        callbacks: extra `TrainerCallback`s.
        config_overrides: `SFTConfig` keywords that win over the settings (e.g. `eval_on_start=True`).
    """
    with adapter_dtype_kept(model, settings):  # QLoRA: TRL would make the adapter bf16
        return Trainer(
            model=model,
            args=sft_config(settings, **config_overrides),
            train_dataset=datasets["train"],
            eval_dataset=datasets["eval"] if "eval" in datasets else None,
            processing_class=tokenizer,
            optimizers=optimizers or (None, None),
            optimizer_factory=optimizer_factory,
            callbacks=callbacks,
            peak_flops=settings.peak_flops,
        )


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf on overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
