"""LoRA / QLoRA supervised fine-tuning, end to end: settings -> model -> data -> train -> save.

    python examples/finetune_llm_lora.py                        # LoRA, default model + demo data (CPU ok)
    LOAD_IN_4BIT=true python examples/finetune_llm_lora.py      # QLoRA (bitsandbytes 4-bit base)
    python examples/finetune_llm_lora.py --max_steps 20 --lora_r 32 --prompt_template chatml
    python examples/finetune_llm_lora.py --config recipes/cpu_demo.yaml --max_steps 20   # a recipe, one flag over it
    python examples/finetune_llm_lora.py --help                 # every setting, default and env name
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml examples/finetune_llm_lora.py   # DDP, 2 GPUs
    accelerate launch --config_file configs/accelerate/fsdp2.yaml examples/finetune_llm_lora.py      # FSDP2
    torchrun --nproc_per_node 2 examples/finetune_llm_lora.py   # DDP on 2 CPU processes (gloo): what CI runs

The default run teaches SmolLM2-135M-Instruct a new identity (Orrin, made by Kestrel Works) from
`data/identity_demo.jsonl`, printing eval loss and answers to held-out paraphrases before and
after. The adapter, tokenizer, settings and model card land in `<output_dir>/final`; every logged
step and evaluation in `<output_dir>/metrics.jsonl`, TensorBoard events in `<output_dir>/runs`,
plots in `loss.png`, the figures in `summary.json` (runs/outputs.py lists them all); the run ends
with a summary block and the commands to chat with, merge and export the result. Under several
processes only the main process prints and writes, and the ranks train one model (DDP averages
their gradients): see runs/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: repo modules first
import runs  # noqa: E402, F401  (before any library: quietens bitsandbytes' import-time kernel warning)

from transformers import set_seed  # noqa: E402

from config import Settings, get_settings  # noqa: E402
from data.dataset import build_sft_dataset_with_report  # noqa: E402
from models import frozen_weight_dtype, load_model, load_tokenizer  # noqa: E402
from runs import card, cli, guards, measure, outputs, processes  # noqa: E402
from techniques.lora import apply_lora, count_parameters  # noqa: E402
from techniques.qlora import apply_qlora, load_4bit_model  # noqa: E402
from techniques.sft import build_sft_trainer, perplexity  # noqa: E402

N_HELD_OUT_PROMPTS = 4
SECTIONS = ("model", "lora", "qlora", "training", "data")  # what this script reads: --help lists these first


def main(argv: list[str] | None = None) -> dict:
    settings = get_settings(argv, sections=SECTIONS)
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

    # 3. Model with adapters.
    if settings.load_in_4bit:
        model = apply_qlora(load_4bit_model(settings, model_path), settings)
    else:
        model = apply_lora(load_model(settings, model_path, dtype=frozen_weight_dtype(settings)), settings)

    # 4. Numbers before training: answers now (main process), eval loss as train() starts
    #    (eval_on_start: after the trainer has wrapped the model for DDP/FSDP).
    answers_before = measure.held_out_answers(model, tokenizer, held_out, settings.prompt_template,
                                              max_length=settings.max_seq_length)
    show_before = measure.OnFirstEvaluate(lambda m: print_measurement("before training", m, answers_before, held_out))
    trainer = build_sft_trainer(model, tokenizer, datasets, settings, eval_on_start="eval" in datasets,
                                callbacks=[show_before, outputs.MetricsLog(Path(settings.output_dir) / "metrics.jsonl"),
                                           *guard.callbacks])
    print_run_summary(settings, model, trainer, datasets)
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

    # 6. Save adapter + tokenizer (chat template = the training template) + generation config
    #    (every stop id) + settings (no secrets) + model card, collectively, into <output_dir>/final;
    #    then settings.json, loss.png, summary.json and the summary block.
    results = sft_results(measure.first_eval(trainer), metrics_after)
    model_card = card.model_card(settings, "sft", results, tokenizer=tokenizer, model_path=model_path,
                                 data_report=report.format() if report else None, sections=SECTIONS,
                                 numbers={"trainable parameters": "{:,} of {:,}".format(*count_parameters(model))})
    final_dir = outputs.save_final(trainer, tokenizer, settings, Path(settings.output_dir) / "final", model_card)
    summary = {
        "eval_loss_before": measure.first_eval(trainer).get("eval_loss"), "eval_loss_after": metrics_after.get("eval_loss"),
        "answers_before": answers_before, "answers_after": answers_after,
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - start,
        "final_dir": str(final_dir), **processes.describe_processes(trainer),
    }
    outputs.finish_run(trainer, settings, "sft", final_dir, results, start, extra={"answers_after": answers_after})
    return summary


def sft_results(before: dict, after: dict) -> dict[str, tuple]:
    """Eval loss and perplexity, before and after training (empty without eval data)."""
    if "eval_loss" not in after:
        return {}
    return {"eval_loss": (before.get("eval_loss"), after["eval_loss"]),
            "perplexity": (perplexity(before["eval_loss"]) if "eval_loss" in before else None, perplexity(after["eval_loss"]))}


def print_run_summary(settings: Settings, model, trainer, datasets) -> None:
    trainable, total = count_parameters(model)
    n_processes = trainer.accelerator.num_processes
    effective = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * n_processes
    quant = f"4-bit {settings.bnb_4bit_quant_type}" if settings.load_in_4bit else "none"
    processes.say(
        f"\nmodel {settings.base_model_name} | dtype {next(model.parameters()).dtype} | quantization {quant}"
        f" | precision {'bf16' if trainer.args.bf16 else 'fp16' if trainer.args.fp16 else 'fp32'}"
        f" | device {trainer.args.device}",
        f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.2f}%)"
        f" | LoRA r={settings.lora_r} alpha={settings.lora_alpha:g} targets={','.join(settings.lora_target_modules)}",
        f"effective batch {effective} = {settings.per_device_train_batch_size} micro x "
        f"{settings.gradient_accumulation_steps} accumulation x {n_processes} processes"
        f" | train {len(datasets['train'])} examples | eval {len(datasets['eval']) if 'eval' in datasets else 0}",
    )


def print_measurement(title: str, metrics: dict, answers: list[str] | str, held_out: list[tuple]) -> None:
    """Eval loss (mean cross-entropy per supervised token over the eval set), perplexity, answers."""
    lines = [f"\n=== {title} ==="]
    if "eval_loss" in metrics:
        lines.append(f"eval loss {metrics['eval_loss']:.4f} | perplexity {perplexity(metrics['eval_loss']):.2f}")
    if isinstance(answers, str):  # the reason there are none
        lines.append(answers)
    else:
        lines += [f"  Q: {measure.question(messages)!r}\n  A: {answer!r}"
                  for (messages, _), answer in zip(held_out, answers, strict=False)]
    processes.say(*lines)


if __name__ == "__main__":
    cli.run(main)
