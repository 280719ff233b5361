"""Full fine-tuning (every weight) with layer-wise LR decay, end to end: settings -> model -> data -> train -> save.

    python examples/full_finetune.py                            # default model + demo data (2-core CPU: 5-9 min)
    python examples/full_finetune.py --llrd_decay 0.9 --freeze_embeddings true --weight_decay 0.01
    LEARNING_RATE=2e-5 NUM_TRAIN_EPOCHS=5 python examples/full_finetune.py
    OPTIM=paged_adamw_8bit GRADIENT_CHECKPOINTING=true python examples/full_finetune.py   # less memory (GPU)
    python examples/full_finetune.py --help                     # every setting, default and env name
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml examples/full_finetune.py     # DDP, 2 GPUs
    accelerate launch --config_file configs/accelerate/fsdp2.yaml examples/full_finetune.py         # FSDP2
    accelerate launch --config_file configs/accelerate/zero3.yaml examples/full_finetune.py         # ZeRO-3
    torchrun --nproc_per_node 2 examples/full_finetune.py       # DDP on 2 CPU processes (gloo)

Learning rate: the global LEARNING_RATE default (1e-3) is a LoRA rate; full fine-tuning moves
every weight and diverges or forgets at such rates. When LEARNING_RATE is not set (flag, env or
.env), this script uses its own FULL_FT_LEARNING_RATE (5e-5) and says so; set LEARNING_RATE to
override. With LLRD (`--llrd_decay 0.9`) that rate is the head's; lower layers get less.

The default run teaches SmolLM2-135M-Instruct a new identity (Orrin, made by Kestrel Works) from
`data/identity_demo.jsonl`, printing the optimizer's LR groups, eval loss and answers to held-out
paraphrases before and after. The model (a normal transformers folder: `AutoModelForCausalLM.
from_pretrained` loads it), tokenizer, settings and model card land in `<output_dir>/final-full`
(not `final`, where the LoRA example puts its adapter); the learning rate of every LLRD group is
logged (TensorBoard, metrics.jsonl, loss.png), and the run ends with a summary block (runs/outputs.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: repo modules first
import runs  # noqa: E402, F401  (before any library: quietens bitsandbytes' import-time kernel warning)

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402

from config import Settings, get_settings  # noqa: E402
from data.dataset import build_sft_dataset_with_report  # noqa: E402
from finetune_llm_lora import N_HELD_OUT_PROMPTS, print_measurement, sft_results  # noqa: E402
from models import load_model, load_tokenizer  # noqa: E402
from runs import card, cli, guards, measure, outputs, processes  # noqa: E402
from techniques.full_finetune import build_optimizer, format_group_table  # noqa: E402
from techniques.lora import count_parameters  # noqa: E402
from techniques.sft import build_sft_trainer  # noqa: E402

# Used when LEARNING_RATE is not set. 5e-5 learns the demo identity in the default 3 epochs (39
# steps; eval loss 4.44 -> 0.21, every held-out answer names Orrin and Kestrel Works); higher
# learns faster and forgets more of the instruct model.
FULL_FT_LEARNING_RATE = 5e-5
SECTIONS = ("model", "full_ft", "training", "data")  # what this script reads: --help lists these first


def main(argv: list[str] | None = None) -> dict:
    settings = full_ft_settings(get_settings(argv, sections=SECTIONS))
    processes.setup_logging()
    guard = guards.RunGuard(settings, __file__, argv)  # before any model loads: output dir, resume point
    set_seed(settings.seed)
    start = time.perf_counter()

    # 1. Model folder and tokenizer (first run of the default model: fetch + dequantize, ~1 min).
    model_path = processes.resolve_model_once(settings)
    tokenizer = load_tokenizer(settings, model_path)

    # 2. Data: tokenized, loss-masked splits (built once per machine), held-out prompts to watch.
    datasets, report = processes.prepare_once(lambda: build_sft_dataset_with_report(settings, tokenizer), settings, "sft")
    processes.say(report.format() if report else "")
    held_out = measure.held_out_prompts(settings, N_HELD_OUT_PROMPTS)

    # 3. Model in fp32: these are the master weights (bf16 weights would round away most updates
    #    at 5e-5; mixed_precision=bf16 still runs the matmuls in bf16 on a GPU).
    model = load_model(settings, model_path, dtype=torch.float32)

    # 4. Trainer; it builds its optimizer from our LLRD groups (freezing applied) through the
    #    factory, which works under DDP, FSDP2 and ZeRO. Numbers before training: answers now,
    #    eval loss as train() starts (eval_on_start).
    answers_before = measure.held_out_answers(model, tokenizer, held_out, settings.prompt_template,
                                              max_length=settings.max_seq_length)
    show_before = measure.OnFirstEvaluate(lambda m: print_measurement("before training", m, answers_before, held_out))
    trainer = build_sft_trainer(model, tokenizer, datasets, settings, eval_on_start="eval" in datasets,
                                optimizer_factory=lambda m: build_optimizer(m, settings),
                                callbacks=[show_before, outputs.MetricsLog(Path(settings.output_dir) / "metrics.jsonl"),
                                           *guard.callbacks])
    optimizer = trainer.create_optimizer()
    print_run_summary(settings, model, trainer, datasets)
    processes.say(format_group_table(optimizer.param_groups))
    if "eval" not in datasets:
        print_measurement("before training", {}, answers_before, held_out)

    # 5. Train (a signal or a diverged step stops it: raised here, before anything is saved as
    #    final), then the same numbers after.
    train_start = time.perf_counter()
    trainer.train(resume_from_checkpoint=guard.resume_from)
    guard.raise_if_stopped(trainer)
    train_seconds = time.perf_counter() - train_start
    metrics_after = measure.final_eval(trainer) if "eval" in datasets else {}  # the last step's eval, if it ran
    answers_after = measure.held_out_answers(model, tokenizer, held_out, settings.prompt_template, trainer,
                                             max_length=settings.max_seq_length)
    print_measurement("after training", metrics_after, answers_after, held_out)

    # 6. Save the whole model (safetensors) + tokenizer + generation config + settings (no secrets)
    #    + model card; then settings.json, loss.png, summary.json and the summary block.
    results = sft_results(measure.first_eval(trainer), metrics_after)
    model_card = card.model_card(settings, "full", results, tokenizer=tokenizer, model_path=model_path,
                                 data_report=report.format() if report else None, sections=SECTIONS,
                                 numbers={"trainable parameters": "{:,} of {:,}".format(*count_parameters(model))})
    final_dir = outputs.save_final(trainer, tokenizer, settings, Path(settings.output_dir) / "final-full", model_card)
    summary = {
        "eval_loss_before": measure.first_eval(trainer).get("eval_loss"), "eval_loss_after": metrics_after.get("eval_loss"),
        "answers_before": answers_before, "answers_after": answers_after,
        "learning_rate": settings.learning_rate,
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - start,
        "final_dir": str(final_dir), **processes.describe_processes(trainer),
    }
    outputs.finish_run(trainer, settings, "full", final_dir, results, start, extra={"answers_after": answers_after})
    return summary


def full_ft_settings(settings: Settings) -> Settings:
    """The settings with FULL_FT_LEARNING_RATE in place of the LoRA default when LEARNING_RATE was not set."""
    if "learning_rate" in settings.model_fields_set:
        return settings
    processes.say(f"learning_rate: LEARNING_RATE not set, using the full fine-tuning default {FULL_FT_LEARNING_RATE:g} "
          f"(the global default {settings.learning_rate:g} is for LoRA)")
    return settings.model_copy(update={"learning_rate": FULL_FT_LEARNING_RATE})


def print_run_summary(settings: Settings, model, trainer, datasets) -> None:
    trainable, total = count_parameters(model)
    n_processes = trainer.accelerator.num_processes
    effective = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * n_processes
    processes.say(
        f"\nmodel {settings.base_model_name} | weights {next(model.parameters()).dtype}"
        f" | precision {'bf16' if trainer.args.bf16 else 'fp16' if trainer.args.fp16 else 'fp32'}"
        f" | device {trainer.args.device} | gradient checkpointing {settings.gradient_checkpointing}",
        f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.2f}%)"
        f" | optimizer {settings.optim} lr {settings.learning_rate:g} llrd_decay {settings.llrd_decay:g}"
        f" | freeze_layers {settings.freeze_layers} freeze_embeddings {settings.freeze_embeddings}",
        f"effective batch {effective} = {settings.per_device_train_batch_size} micro x "
        f"{settings.gradient_accumulation_steps} accumulation x {n_processes} processes"
        f" | train {len(datasets['train'])} examples | eval {len(datasets['eval']) if 'eval' in datasets else 0}",
    )


if __name__ == "__main__":
    cli.run(main)
