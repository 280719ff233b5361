"""Full fine-tuning (every weight) with layer-wise LR decay, end to end: settings -> model -> data -> train -> save.

    python examples/full_finetune.py                            # default model + demo data (2-core CPU: 5-9 min)
    python examples/full_finetune.py --llrd_decay 0.9 --freeze_embeddings true --weight_decay 0.01
    LEARNING_RATE=2e-5 NUM_TRAIN_EPOCHS=5 python examples/full_finetune.py
    OPTIM=paged_adamw_8bit GRADIENT_CHECKPOINTING=true python examples/full_finetune.py   # less memory (GPU)
    python examples/full_finetune.py --help                     # every setting, default and env name
    accelerate launch --num_processes 2 examples/full_finetune.py   # DDP on 2 GPUs

Learning rate: the global LEARNING_RATE default (1e-3) is a LoRA rate; full fine-tuning moves
every weight and diverges or forgets at such rates. When LEARNING_RATE is not set (flag, env or
.env), this script uses its own FULL_FT_LEARNING_RATE (5e-5) and says so; set LEARNING_RATE to
override. With LLRD (`--llrd_decay 0.9`) that rate is the head's; lower layers get less.

The default run teaches SmolLM2-135M-Instruct a new identity (Orrin, made by Kestrel Works) from
`data/identity_demo.jsonl`, printing the optimizer's LR groups, eval loss and answers to held-out
paraphrases before and after. The model (a normal transformers folder: `AutoModelForCausalLM.
from_pretrained` loads it), tokenizer and settings land in `<output_dir>/final-full` (not `final`,
where the LoRA example puts its adapter).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: repo modules first

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402

from config import Settings, get_settings, save_settings  # noqa: E402
from data.dataset import build_sft_dataset_with_report  # noqa: E402
from data.chat_templates import chat_template_for  # noqa: E402
from finetune_llm_lora import held_out_prompts, measure, print_measurement, save_generation_config  # noqa: E402
from models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from techniques.full_finetune import build_optimizer, format_group_table  # noqa: E402
from techniques.lora import count_parameters  # noqa: E402
from techniques.sft import build_sft_trainer  # noqa: E402

log = logging.getLogger("full_finetune")
N_HELD_OUT_PROMPTS = 4
# Used when LEARNING_RATE is not set. 5e-5 learns the demo identity in the default 3 epochs (39
# steps; eval loss 4.44 -> 0.21, every held-out answer names Orrin and Kestrel Works); higher
# learns faster and forgets more of the instruct model.
FULL_FT_LEARNING_RATE = 5e-5


def main(argv: list[str] | None = None) -> dict:
    settings = full_ft_settings(get_settings(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_seed(settings.seed)
    start = time.perf_counter()

    # 1. Model folder and tokenizer (first run of the default model: fetch + dequantize, ~1 min).
    model_path = resolve_model_path(settings)
    tokenizer = load_tokenizer(settings, model_path)

    # 2. Data: tokenized, loss-masked splits, and held-out prompts to watch.
    datasets, report = build_sft_dataset_with_report(settings, tokenizer)
    print(report.format())
    held_out = held_out_prompts(settings, N_HELD_OUT_PROMPTS)

    # 3. Model in fp32: these are the master weights (bf16 weights would round away most updates
    #    at 5e-5; mixed_precision=bf16 still runs the matmuls in bf16 on a GPU).
    model = load_model(settings, model_path, dtype=torch.float32)

    # 4. Optimizer over LLRD groups (freezing applied), trainer; numbers before training.
    optimizer = build_optimizer(model, settings)
    trainer = build_sft_trainer(model, tokenizer, datasets, settings, optimizers=(optimizer, None))
    print_run_summary(settings, model, trainer, datasets)
    print(format_group_table(optimizer.param_groups))
    before = measure(trainer, tokenizer, held_out, settings)
    print_measurement("before training", before, held_out)

    # 5. Train, then the same numbers after.
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    after = measure(trainer, tokenizer, held_out, settings)
    print_measurement("after training", after, held_out)

    # 6. Save the whole model (safetensors) + tokenizer + generation config + settings (no secrets).
    final_dir = Path(settings.output_dir) / "final-full"
    tokenizer.chat_template = chat_template_for(settings.prompt_template, tokenizer, settings.system_prompt)  # render as trained
    trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        save_generation_config(tokenizer, settings, final_dir)
        save_settings(settings, final_dir / "run_settings.json")
    summary = {
        "eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
        "answers_before": before["answers"], "answers_after": after["answers"],
        "learning_rate": settings.learning_rate,
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - start,
        "final_dir": str(final_dir),
    }
    print(f"\nSaved model, tokenizer and settings to {final_dir}; "
          f"train {train_seconds:.0f}s, total {summary['total_seconds']:.0f}s.")
    return summary


def full_ft_settings(settings: Settings) -> Settings:
    """The settings with FULL_FT_LEARNING_RATE in place of the LoRA default when LEARNING_RATE was not set."""
    if "learning_rate" in settings.model_fields_set:
        return settings
    print(f"learning_rate: LEARNING_RATE not set, using the full fine-tuning default {FULL_FT_LEARNING_RATE:g} "
          f"(the global default {settings.learning_rate:g} is for LoRA)")
    return settings.model_copy(update={"learning_rate": FULL_FT_LEARNING_RATE})


def print_run_summary(settings: Settings, model, trainer, datasets) -> None:
    trainable, total = count_parameters(model)
    processes = trainer.accelerator.num_processes
    effective = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * processes
    print(f"\nmodel {settings.base_model_name} | weights {next(model.parameters()).dtype}"
          f" | precision {'bf16' if trainer.args.bf16 else 'fp16' if trainer.args.fp16 else 'fp32'}"
          f" | device {trainer.args.device} | gradient checkpointing {settings.gradient_checkpointing}")
    print(f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.2f}%)"
          f" | optimizer {settings.optim} lr {settings.learning_rate:g} llrd_decay {settings.llrd_decay:g}"
          f" | freeze_layers {settings.freeze_layers} freeze_embeddings {settings.freeze_embeddings}")
    print(f"effective batch {effective} = {settings.per_device_train_batch_size} micro x "
          f"{settings.gradient_accumulation_steps} accumulation x {processes} processes"
          f" | train {len(datasets['train'])} examples | eval {len(datasets['eval']) if 'eval' in datasets else 0}")


if __name__ == "__main__":
    main()
