"""Supervised fine-tuning trainer (TRL `SFTTrainer`) shared by the LoRA, QLoRA and full recipes.

The dataset arrives already tokenized with `labels` (see `data.dataset.build_sft_example`), so
TRL uses our loss masks as they are: its own chat-template and truncation handling stay off.
"""

from __future__ import annotations

import math

from datasets import DatasetDict
from transformers import PreTrainedModel
from trl import SFTConfig, SFTTrainer

from config import Settings, resolve_precision


def sft_config(settings: Settings, **overrides) -> SFTConfig:
    """TRL `SFTConfig` from the training settings.

    TRL's defaults that would surprise here are set explicitly: `bf16` (TRL defaults to True)
    follows `resolve_precision` (fp32 on CPU), `gradient_checkpointing` (TRL defaults to True)
    follows the setting, `use_cpu` is set on a machine without CUDA (TRL refuses to start
    otherwise), `report_to="none"` (no tracker unless asked), and `max_length=None` because
    examples were already truncated by our documented rule. `overrides` win over everything.
    """
    import torch

    precision = resolve_precision(settings)
    eval_steps = settings.eval_steps or None
    args = dict(
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
        max_length=None,
        report_to="none",
        dataloader_num_workers=0,
    )
    args.update(overrides)
    return SFTConfig(**args)


def build_sft_trainer(
    model: PreTrainedModel,
    tokenizer,
    datasets: DatasetDict,
    settings: Settings,
    **config_overrides,
) -> SFTTrainer:
    """An `SFTTrainer` over `datasets["train"]` (and `datasets["eval"]` when present).

    Args:
        model: the model to train (a PeftModel for LoRA/QLoRA; a plain model for full fine-tuning).
        tokenizer: passed as `processing_class`; it is saved with checkpoints.
        datasets: splits with `input_ids` and `labels` columns (lists of int).
    """
    return SFTTrainer(
        model=model,
        args=sft_config(settings, **config_overrides),
        train_dataset=datasets["train"],
        eval_dataset=datasets["eval"] if "eval" in datasets else None,
        processing_class=tokenizer,
    )


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf on overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
