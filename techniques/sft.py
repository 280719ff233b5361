"""Supervised fine-tuning trainer (TRL `SFTTrainer`) shared by the LoRA, QLoRA and full recipes.

The dataset arrives already tokenized with `labels` (see `data.examples.build_sft_example`), so
TRL uses our loss masks as they are: its own chat-template and truncation handling stay off.
"""

from __future__ import annotations

import math

from datasets import DatasetDict
from transformers import PreTrainedModel
from trl import SFTConfig, SFTTrainer

from config import Settings, resolve_precision


def trainer_arguments(settings: Settings) -> dict:
    """`TrainingArguments` keywords shared by every trainer here (SFT, DPO), from the settings.

    TRL's defaults that would surprise are set explicitly: `bf16` (TRL defaults to True) follows
    `resolve_precision` (fp32 on CPU), `gradient_checkpointing` (TRL defaults to True) follows the
    setting, `use_cpu` is set on a machine without CUDA (TRL refuses to start otherwise), and
    `report_to="none"` (no tracker unless asked). Steps set to 0 mean "never" (eval, save).
    """
    import torch

    precision = resolve_precision(settings)
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
        gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        dataloader_num_workers=0,
    )


def sft_config(settings: Settings, **overrides) -> SFTConfig:
    """TRL `SFTConfig`: `trainer_arguments` plus SFT's own keywords; `overrides` win over everything.

    `max_length=None` without packing because examples were already truncated by our documented
    rule (`data.examples.build_sft_example`).

    Packing (`settings.packing`): TRL packs the train examples best-fit-decreasing into rows of
    max_seq_length tokens (`max_length`, which then only sizes rows: no example is longer) and its
    padding-free collator concatenates each batch into one row with `position_ids` restarting at 0
    per example, no `attention_mask`, and label -100 on each example's first token. With no
    attention mask and no cache (TRL passes use_cache=False), transformers builds a block-diagonal
    causal mask from those position ids for sdpa and eager attention (flash attention reads the
    sequence boundaries instead), so no token sees another example. Eval is not packed
    (`eval_packing=False`): its batches hold the same examples as without packing, concatenated by
    the same padding-free collator. tests/test_packing.py checks all of this.

    Worked example, examples a (3 tokens) and b (5 tokens) in one packed row:

        input_ids:    a0    a1  a2  b0    b1  b2  b3  b4
        position_ids: 0     1   2   0     1   2   3   4      (no attention_mask)
        labels:       -100  a1  a2  -100  b1  b2  b3  b4     (b0 is never a target of a2)
        attention:    a* see only a*, b* see only b* (causal within each)
    """
    args = trainer_arguments(settings)
    args.update(
        max_length=settings.max_seq_length if settings.packing else None,
        packing=settings.packing,
        packing_strategy="bfd",  # whole examples only; "wrapped" would cut them across rows
        eval_packing=False,
    )
    args.update(overrides)
    return SFTConfig(**args)


def build_sft_trainer(
    model: PreTrainedModel,
    tokenizer,
    datasets: DatasetDict,
    settings: Settings,
    optimizers=None,
    **config_overrides,
) -> SFTTrainer:
    """An `SFTTrainer` over `datasets["train"]` (and `datasets["eval"]` when present).

    Args:
        model: the model to train (a PeftModel for LoRA/QLoRA; a plain model for full fine-tuning).
        tokenizer: passed as `processing_class`; it is saved with checkpoints.
        datasets: splits with `input_ids` and `labels` columns (lists of int).
        optimizers: `(optimizer, scheduler)` passed to the trainer as is (either may be None: the
            trainer builds that one from the settings); None = the trainer's default AdamW and
            scheduler. Full fine-tuning passes `(techniques.full_finetune.build_optimizer(...), None)`.
    """
    return SFTTrainer(
        model=model,
        args=sft_config(settings, **config_overrides),
        train_dataset=datasets["train"],
        eval_dataset=datasets["eval"] if "eval" in datasets else None,
        processing_class=tokenizer,
        optimizers=optimizers or (None, None),
    )


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf on overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
