"""DPO (direct preference optimization), end to end: settings -> data -> policy -> train -> save.

    python examples/dpo.py                                      # LoRA DPO, default model + demo pairs (CPU ok)
    LOAD_IN_4BIT=true python examples/dpo.py                    # QLoRA DPO (4-bit base)
    python examples/dpo.py --sft_adapter_dir ft-outputs/final   # continue an SFT adapter; reference = that adapter
    python examples/dpo.py --dpo_policy full --learning_rate 5e-6 --precompute_ref_log_probs true   # full DPO
    python examples/dpo.py --loss_type ipo --beta 0.5           # or hinge, robust, ... (--help lists all)
    python examples/dpo.py --dpo_dataset_path ../shared/datasets/llamafactory/dpo_en_demo.json --max_length 1024
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml examples/dpo.py   # DDP, 2 GPUs
    torchrun --nproc_per_node 2 examples/dpo.py                 # DDP on 2 CPU processes (gloo)
    accelerate launch --config_file configs/accelerate/fsdp2.yaml examples/dpo.py       # FSDP2, LoRA policy
    accelerate launch --config_file configs/accelerate/zero3.yaml examples/dpo.py --dpo_policy full --learning_rate 5e-6   # ZeRO-3

The default run teaches SmolLM2-135M-Instruct the preference in `data/preference_demo.jsonl`:
direct answers over answers padded with filler ("Great question! ... Hope this helps!"). It
prints, before and after training, the eval split's reward accuracy and margin (both 0 before:
policy == reference) and the held-out preference accuracy: how often the policy itself gives the
chosen answer a higher average log-probability per token than the rejected one, on pairs it never
trained on. The adapter, tokenizer, settings and model card land in `<output_dir>/final`; TRL's
rewards and margins are logged at every logging step (TensorBoard, metrics.jsonl, loss.png), and
the run ends with a summary block (runs/outputs.py).

Under FSDP2 and DeepSpeed ZeRO the script is the same: the trainer shards the policy when training
starts; a full policy's frozen reference is sharded by TRL's DPOTrainer the same way, a LoRA
policy needs none (its reference is the adapter switched off); the final folder goes through the
trainer's collective save. The held-out preference needs the whole policy on one process, so
after training under FSDP or ZeRO-3 the run prints why it is skipped. Only DDP was run here
(2 CPU processes, tests/test_distributed.py); the FSDP and ZeRO launches above were not (no GPUs).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: repo modules first
import runs  # noqa: E402, F401  (before any library: quietens bitsandbytes' import-time kernel warning)

from accelerate.utils import is_peft_model  # noqa: E402
from transformers import set_seed  # noqa: E402

from config import Settings, get_settings  # noqa: E402
from models import load_tokenizer  # noqa: E402
from runs import card, cli, guards, measure, outputs, processes  # noqa: E402
from techniques.dpo import (  # noqa: E402
    build_dpo_trainer,
    build_preference_dataset,
    load_policy,
    loss_types_and_weights,
    pair_log_probs,
    preference_accuracy,
)
from techniques.lora import count_parameters  # noqa: E402


SECTIONS = ("model", "dpo", "lora", "qlora", "training", "data")  # what this script reads: --help lists these first


def main(argv: list[str] | None = None) -> dict:
    settings = get_settings(argv, sections=SECTIONS)
    processes.setup_logging()
    guard = guards.RunGuard(settings, __file__, argv)  # before any model loads: output dir, resume point
    set_seed(settings.seed)
    start = time.perf_counter()

    # 1. Model folder and tokenizer (first run of the default model: fetch + dequantize, ~1 min).
    model_path = processes.resolve_model_once(settings)
    tokenizer = load_tokenizer(settings, model_path)

    # 2. Preference pairs, rendered in the SFT template and tokenized by construction (once per machine).
    splits, _ = processes.prepare_once(lambda: (build_preference_dataset(settings, tokenizer), None), settings, "dpo")
    eval_split = splits.get("eval")

    # 3. Policy (LoRA / QLoRA / LoRA on an SFT adapter / full); the trainer builds the reference.
    #    Numbers before training: the held-out preference now (main process), TRL's reward
    #    metrics as train() starts (eval_on_start: after the trainer has wrapped the model).
    policy = load_policy(settings, model_path)
    held_out_before = held_out_preference(policy, eval_split, tokenizer, settings)
    show_before = measure.OnFirstEvaluate(lambda m: print_measurement("before training", {**m, **held_out_before}))
    trainer = build_dpo_trainer(policy, tokenizer, splits["train"], eval_split, settings,
                                eval_on_start=eval_split is not None,
                                callbacks=[show_before, outputs.MetricsLog(Path(settings.output_dir) / "metrics.jsonl"),
                                           *guard.callbacks])
    print_run_summary(settings, policy, trainer, splits)
    if eval_split is None:
        print_measurement("before training", {})

    # 4. Train (a signal or a diverged step stops it: raised here, before anything is saved as
    #    final), then the same numbers after.
    train_start = time.perf_counter()
    train_loss = trainer.train(resume_from_checkpoint=guard.resume_from).training_loss
    guard.raise_if_stopped(trainer)
    train_seconds = time.perf_counter() - train_start
    after = {**(measure.final_eval(trainer) if eval_split is not None else {}),  # the last step's eval, if it ran
             **held_out_preference(policy, eval_split, tokenizer, settings, trainer)}
    print_measurement("after training", after)

    # 5. Save the policy (only the trained adapter, not TRL's frozen "ref" copy), tokenizer, settings,
    #    model card; then settings.json, loss.png, summary.json and the summary block.
    before = {**measure.first_eval(trainer), **held_out_before}
    results = {key: (before.get(metric), after.get(metric)) for key, metric in SUMMARY_METRICS.items() if metric in after}
    pairs = f"{len(splits['train'])} train, {len(eval_split) if eval_split is not None else 0} eval"
    model_card = card.model_card(settings, "dpo", results, tokenizer=tokenizer, model_path=model_path,
                                 sections=SECTIONS, numbers={"preference pairs": pairs, "reference": reference_of(settings, policy)})
    final_dir = outputs.save_final(trainer, tokenizer, settings, Path(settings.output_dir) / "final", model_card)
    skipped = {"held_out_skipped": after["held_out_skipped"]} if "held_out_skipped" in after else {}  # FSDP, ZeRO-3
    summary = {
        "train_pairs": len(splits["train"]), "eval_pairs": len(eval_split) if eval_split is not None else 0,
        "train_loss": train_loss, "train_seconds": train_seconds, "total_seconds": time.perf_counter() - start,
        "final_dir": str(final_dir), **processes.describe_processes(trainer),
        **{f"{key}_before": before.get(metric) for key, metric in SUMMARY_METRICS.items()},
        **{f"{key}_after": after.get(metric) for key, metric in SUMMARY_METRICS.items()}, **skipped,
    }
    outputs.finish_run(trainer, settings, "dpo", final_dir, results, start, extra=skipped)
    return summary


# summary key -> metric name (TRL's eval metrics, weighted by pairs, and our held-out preference)
SUMMARY_METRICS = {
    "eval_loss": "eval_loss", "eval_reward_accuracy": "eval_rewards/accuracies",
    "eval_reward_margin": "eval_rewards/margins", "held_out_accuracy": "held_out_accuracy",
    "held_out_accuracy_sum_logp": "held_out_accuracy_sum_logp",
}


def held_out_preference(policy, eval_split, tokenizer, settings: Settings, trainer=None) -> dict:
    """The policy's own preference on the held-out pairs, on the main process: chosen wins when its
    mean log-prob per answer token is higher (per token, so that answer length alone cannot decide
    it); also by summed log-prob. Empty without eval pairs and on other processes.

    Pass the `trainer` after training: when it has sharded the weights (FSDP, ZeRO-3) no single
    process holds the policy, and {"held_out_skipped": the reason} comes back instead (as
    `runs.measure.held_out_answers` does for SFT), so the run says why the figure is missing.
    """
    if eval_split is None or len(eval_split) == 0:
        return {}
    reason = processes.sharded_weights(trainer) if trainer is not None else None
    if reason:
        return {"held_out_skipped": f"held-out preference skipped: {reason}; score the saved folder on one process "
                                    "(techniques.dpo.pair_log_probs, preference_accuracy)"}
    if not processes.is_main():
        return {}
    chosen, rejected = pair_log_probs(policy, eval_split, tokenizer.pad_token_id, settings.per_device_eval_batch_size)
    return {"held_out_accuracy": preference_accuracy(chosen, rejected, eval_split),
            "held_out_accuracy_sum_logp": preference_accuracy(chosen, rejected)}


def print_run_summary(settings: Settings, model, trainer, splits) -> None:
    trainable, total = count_parameters(model)
    n_processes = trainer.accelerator.num_processes
    effective = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * n_processes
    kind = settings.dpo_policy + (" (4-bit base: QLoRA)" if settings.load_in_4bit else "")
    kind += f" on SFT adapter {settings.sft_adapter_dir}" if settings.sft_adapter_dir else ""
    reference = reference_of(settings, model)
    types, weights = loss_types_and_weights(settings)
    loss = " + ".join(f"{w:g}*{t}" for t, w in zip(types, weights, strict=True))
    processes.say(
        f"\nmodel {settings.base_model_name} | policy {kind} | reference {reference} | device {trainer.args.device}"
        f" | precision {'bf16' if trainer.args.bf16 else 'fp16' if trainer.args.fp16 else 'fp32'}",
        f"trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.2f}%)"
        f" | loss {loss} | beta {settings.beta:g} | template {settings.prompt_template}",
        f"effective batch {effective} pairs = {settings.per_device_train_batch_size} micro x "
        f"{settings.gradient_accumulation_steps} accumulation x {n_processes} processes"
        f" | train {len(splits['train'])} pairs | eval {len(splits['eval']) if 'eval' in splits else 0}",
    )


def reference_of(settings: Settings, policy) -> str:
    """What the DPO reference is, in words (see techniques.dpo.build_dpo_trainer)."""
    if settings.ref_model:
        return settings.ref_model
    if is_peft_model(policy):
        return "the frozen SFT adapter" if settings.sft_adapter_dir else "the base (adapter disabled)"
    return "precomputed log-probs" if settings.precompute_ref_log_probs else "a frozen copy"


def print_measurement(title: str, result: dict) -> None:
    lines = [f"\n=== {title} ==="]
    if "eval_loss" not in result:
        lines.append("no eval pairs (set eval_split_size or dpo_eval_dataset_path)")
    else:
        lines.append(f"eval loss {result['eval_loss']:.4f} | reward accuracy {result['eval_rewards/accuracies']:.3f}"
                     f" | reward margin {result['eval_rewards/margins']:.4f}")
    if "held_out_accuracy" in result:
        lines.append(f"held-out preference accuracy {result['held_out_accuracy']:.3f} (mean log-prob per answer "
                     f"token; by summed log-prob {result['held_out_accuracy_sum_logp']:.3f})")
    if "held_out_skipped" in result:  # the reason there is no accuracy
        lines.append(result["held_out_skipped"])
    processes.say(*lines)


if __name__ == "__main__":
    cli.run(main)
