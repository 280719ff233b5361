"""DPO (direct preference optimization), end to end: settings -> data -> policy -> train -> save.

    python examples/dpo.py                                      # LoRA DPO, default model + demo pairs (CPU ok)
    LOAD_IN_4BIT=true python examples/dpo.py                    # QLoRA DPO (4-bit base)
    python examples/dpo.py --sft_adapter_dir ft-outputs/final   # continue an SFT adapter; reference = that adapter
    python examples/dpo.py --dpo_policy full --learning_rate 5e-6 --precompute_ref_log_probs true   # full DPO
    python examples/dpo.py --loss_type ipo --beta 0.5           # or hinge, robust, ... (--help lists all)
    python examples/dpo.py --dpo_dataset_path ../shared/datasets/llamafactory/dpo_en_demo.json --max_length 1024
    accelerate launch --num_processes 2 examples/dpo.py         # DDP on 2 GPUs

The default run teaches SmolLM2-135M-Instruct the preference in `data/preference_demo.jsonl`:
direct answers over answers padded with filler ("Great question! ... Hope this helps!"). It
prints, before and after training, the eval split's reward accuracy and margin (both 0 before:
policy == reference) and the held-out preference accuracy: how often the policy itself gives the
chosen answer a higher average log-probability per token than the rejected one, on pairs it never
trained on. The adapter, tokenizer and settings land in `<output_dir>/final`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: repo modules first

from accelerate.utils import is_peft_model  # noqa: E402
from transformers import set_seed  # noqa: E402

from config import Settings, get_settings, save_settings  # noqa: E402
from data.chat_templates import chat_template_for  # noqa: E402
from finetune_llm_lora import save_generation_config  # noqa: E402
from models import load_tokenizer, resolve_model_path  # noqa: E402
from techniques.dpo import (  # noqa: E402
    build_dpo_trainer,
    build_preference_dataset,
    load_policy,
    loss_types_and_weights,
    pair_log_probs,
    preference_accuracy,
)
from techniques.lora import count_parameters  # noqa: E402

log = logging.getLogger("dpo")


def main(argv: list[str] | None = None) -> dict:
    settings = get_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_seed(settings.seed)
    start = time.perf_counter()

    # 1. Model folder and tokenizer (first run of the default model: fetch + dequantize, ~1 min).
    model_path = resolve_model_path(settings)
    tokenizer = load_tokenizer(settings, model_path)

    # 2. Preference pairs, rendered in the SFT template and tokenized by construction.
    splits = build_preference_dataset(settings, tokenizer)
    eval_split = splits.get("eval")

    # 3. Policy (LoRA / QLoRA / LoRA on an SFT adapter / full) and trainer (which builds the reference).
    policy = load_policy(settings, model_path)
    trainer = build_dpo_trainer(policy, tokenizer, splits["train"], eval_split, settings)
    print_run_summary(settings, policy, trainer, splits)

    # 4. Numbers before training, train, the same numbers after.
    before = measure(trainer, eval_split, tokenizer)
    print_measurement("before training", before)
    train_start = time.perf_counter()
    train_loss = trainer.train().training_loss
    train_seconds = time.perf_counter() - train_start
    after = measure(trainer, eval_split, tokenizer)
    print_measurement("after training", after)

    # 5. Save the policy (only the trained adapter, not TRL's frozen "ref" copy), tokenizer, settings.
    final_dir = Path(settings.output_dir) / "final"
    tokenizer.chat_template = chat_template_for(settings.prompt_template, tokenizer, settings.system_prompt)  # render as trained
    if trainer.is_world_process_zero():
        if is_peft_model(trainer.model):
            trainer.model.save_pretrained(final_dir, selected_adapters=["default"])
            tokenizer.save_pretrained(final_dir)
        else:
            trainer.save_model(str(final_dir))
        save_generation_config(tokenizer, settings, final_dir)
        save_settings(settings, final_dir / "run_settings.json")
    summary = {
        "train_pairs": len(splits["train"]), "eval_pairs": len(eval_split) if eval_split is not None else 0,
        "train_loss": train_loss, "train_seconds": train_seconds, "total_seconds": time.perf_counter() - start,
        "final_dir": str(final_dir),
        **{f"{key}_before": value for key, value in before.items()},
        **{f"{key}_after": value for key, value in after.items()},
    }
    print(f"\nSaved the policy, tokenizer and settings to {final_dir}; "
          f"train {train_seconds:.0f}s, total {summary['total_seconds']:.0f}s.")
    return summary


def measure(trainer, eval_split, tokenizer) -> dict:
    """Reward accuracy / margin (policy vs reference, TRL's eval) and the policy's own preference
    on the held-out pairs: chosen wins when its mean log-prob per answer token is higher (per token,
    so that answer length alone cannot decide it)."""
    if eval_split is None or len(eval_split) == 0:
        return {}
    metrics = trainer.evaluate()
    chosen, rejected = pair_log_probs(trainer.model, eval_split, tokenizer.pad_token_id,
                                      trainer.args.per_device_eval_batch_size)
    return {
        "eval_loss": metrics["eval_loss"],
        "eval_reward_accuracy": metrics["eval_rewards/accuracies"],
        "eval_reward_margin": metrics["eval_rewards/margins"],
        "held_out_accuracy": preference_accuracy(chosen, rejected, eval_split),
        "held_out_accuracy_sum_logp": preference_accuracy(chosen, rejected),
    }


def print_run_summary(settings: Settings, model, trainer, splits) -> None:
    trainable, total = count_parameters(model)
    processes = trainer.accelerator.num_processes
    effective = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * processes
    kind = settings.dpo_policy + (" (4-bit base: QLoRA)" if settings.load_in_4bit else "")
    kind += f" on SFT adapter {settings.sft_adapter_dir}" if settings.sft_adapter_dir else ""
    if settings.ref_model:
        reference = settings.ref_model
    elif is_peft_model(model):
        reference = "the frozen SFT adapter" if settings.sft_adapter_dir else "the base (adapter disabled)"
    else:
        reference = "precomputed log-probs" if settings.precompute_ref_log_probs else "a frozen copy"
    types, weights = loss_types_and_weights(settings)
    loss = " + ".join(f"{w:g}*{t}" for t, w in zip(types, weights, strict=True))
    print(f"\nmodel {settings.base_model_name} | policy {kind} | reference {reference} | device {trainer.args.device}"
          f" | precision {'bf16' if trainer.args.bf16 else 'fp16' if trainer.args.fp16 else 'fp32'}")
    print(f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.2f}%)"
          f" | loss {loss} | beta {settings.beta:g} | template {settings.prompt_template}")
    print(f"effective batch {effective} pairs = {settings.per_device_train_batch_size} micro x "
          f"{settings.gradient_accumulation_steps} accumulation x {processes} processes"
          f" | train {len(splits['train'])} pairs | eval {len(splits['eval']) if 'eval' in splits else 0}")


def print_measurement(title: str, result: dict) -> None:
    print(f"\n=== {title} ===")
    if not result:
        print("no eval pairs (set eval_split_size or dpo_eval_dataset_path)")
        return
    print(f"eval loss {result['eval_loss']:.4f} | reward accuracy {result['eval_reward_accuracy']:.3f}"
          f" | reward margin {result['eval_reward_margin']:.4f}")
    print(f"held-out preference accuracy {result['held_out_accuracy']:.3f} (mean log-prob per answer token; "
          f"by summed log-prob {result['held_out_accuracy_sum_logp']:.3f})")


if __name__ == "__main__":
    main()
