"""LoRA / QLoRA supervised fine-tuning, end to end: settings -> model -> data -> train -> save.

    python examples/finetune_llm_lora.py                        # LoRA, default model + demo data (CPU ok)
    LOAD_IN_4BIT=true python examples/finetune_llm_lora.py      # QLoRA (bitsandbytes 4-bit base)
    python examples/finetune_llm_lora.py --max_steps 20 --lora_r 32 --prompt_template chatml
    python examples/finetune_llm_lora.py --help                 # every setting, default and env name
    accelerate launch --num_processes 2 examples/finetune_llm_lora.py   # DDP on 2 GPUs

The default run teaches SmolLM2-135M-Instruct a new identity (Orrin, made by Kestrel Works) from
`data/identity_demo.jsonl`, printing eval loss and answers to held-out paraphrases before and
after. The adapter, tokenizer and settings land in `<output_dir>/final`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: repo modules first

from transformers import GenerationConfig, set_seed  # noqa: E402

from config import Settings, get_settings, save_settings  # noqa: E402
from data.chat_templates import chat_template_for  # noqa: E402
from data.dataset import build_sft_dataset_with_report  # noqa: E402
from data.readers import held_out_prompt, load_splits  # noqa: E402
from data.templates import stop_token_ids  # noqa: E402
from inference import generate_replies  # noqa: E402
from models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from techniques.lora import apply_lora, count_parameters  # noqa: E402
from techniques.qlora import apply_qlora, load_4bit_model  # noqa: E402
from techniques.sft import build_sft_trainer, perplexity  # noqa: E402

log = logging.getLogger("finetune")
N_HELD_OUT_PROMPTS = 4


def main(argv: list[str] | None = None) -> dict:
    settings = get_settings(argv)
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

    # 3. Model with adapters.
    if settings.load_in_4bit:
        model = apply_qlora(load_4bit_model(settings, model_path), settings)
    else:
        model = apply_lora(load_model(settings, model_path), settings)

    # 4. Trainer; numbers before training.
    trainer = build_sft_trainer(model, tokenizer, datasets, settings)
    print_run_summary(settings, model, trainer, datasets)
    before = measure(trainer, tokenizer, held_out, settings)
    print_measurement("before training", before, held_out)

    # 5. Train, then the same numbers after.
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    after = measure(trainer, tokenizer, held_out, settings)
    print_measurement("after training", after, held_out)

    # 6. Save adapter + tokenizer (its chat template = the training template, so servers prompt
    #    the way the model learned) + generation config (every stop id) + settings (no secrets).
    final_dir = Path(settings.output_dir) / "final"
    tokenizer.chat_template = chat_template_for(settings.prompt_template, tokenizer, settings.system_prompt)
    trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        save_generation_config(tokenizer, settings, final_dir)
        save_settings(settings, final_dir / "run_settings.json")
    summary = {
        "eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
        "answers_before": before["answers"], "answers_after": after["answers"],
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - start,
        "final_dir": str(final_dir),
    }
    print(f"\nSaved adapter, tokenizer and settings to {final_dir}; "
          f"train {train_seconds:.0f}s, total {summary['total_seconds']:.0f}s.")
    return summary


def held_out_prompts(settings: Settings, n: int) -> list[list[dict]]:
    """The first `n` eval conversations, cut before their last assistant turn."""
    return [held_out_prompt(messages)[0] for messages in load_splits(settings).get("eval", [])[:n]]


def measure(trainer, tokenizer, held_out: list[list[dict]], settings: Settings) -> dict:
    """Eval loss / perplexity on the eval split and greedy answers to the held-out prompts."""
    result = {"eval_loss": None, "perplexity": None, "answers": []}
    if trainer.eval_dataset is not None:
        result["eval_loss"] = trainer.evaluate()["eval_loss"]
        result["perplexity"] = perplexity(result["eval_loss"])
    if held_out and trainer.accelerator.num_processes == 1:  # sharded (FSDP) weights can't generate per rank
        result["answers"] = generate_replies(trainer.model, tokenizer, held_out, settings.prompt_template)
    return result


def print_run_summary(settings: Settings, model, trainer, datasets) -> None:
    trainable, total = count_parameters(model)
    processes = trainer.accelerator.num_processes
    effective = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * processes
    quant = f"4-bit {settings.bnb_4bit_quant_type}" if settings.load_in_4bit else "none"
    print(f"\nmodel {settings.base_model_name} | dtype {next(model.parameters()).dtype} | quantization {quant}"
          f" | precision {'bf16' if trainer.args.bf16 else 'fp16' if trainer.args.fp16 else 'fp32'}"
          f" | device {trainer.args.device}")
    print(f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.2f}%)"
          f" | LoRA r={settings.lora_r} alpha={settings.lora_alpha:g} targets={','.join(settings.lora_target_modules)}")
    print(f"effective batch {effective} = {settings.per_device_train_batch_size} micro x "
          f"{settings.gradient_accumulation_steps} accumulation x {processes} processes"
          f" | train {len(datasets['train'])} examples | eval {len(datasets['eval']) if 'eval' in datasets else 0}")


def print_measurement(title: str, result: dict, held_out: list[list[dict]]) -> None:
    print(f"\n=== {title} ===")
    if result["eval_loss"] is not None:
        print(f"eval loss {result['eval_loss']:.4f} | perplexity {result['perplexity']:.2f}")
    for messages, answer in zip(held_out, result["answers"]):
        print(f"  Q: {messages[-1]['content']!r}\n  A: {answer!r}")


def save_generation_config(tokenizer, settings: Settings, final_dir: Path) -> None:
    """A generation config that stops on every stop id of the template (eos + turn end)."""
    stops = stop_token_ids(settings.prompt_template, tokenizer)
    GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(final_dir)


if __name__ == "__main__":
    main()
