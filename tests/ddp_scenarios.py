"""Run every example script for a few steps on a tiny model, as one process or under torchrun.

    python tests/ddp_scenarios.py MODEL_DIR OUT_DIR 8                              # 1 process, micro batch 8
    torchrun --nproc_per_node 2 tests/ddp_scenarios.py MODEL_DIR OUT_DIR 4         # 2 processes, micro batch 4
    SIGTERM_RANK_1_AT_STEP=2 torchrun --nproc_per_node 2 tests/ddp_scenarios.py MODEL_DIR OUT_DIR 4 lora

Both give a global batch of 8, so the two runs must agree step for step. Each scenario writes its
run into OUT_DIR/<scenario>/ (metrics.jsonl, final folder, summary.json, ...) and the main process
writes the dict the example returns to OUT_DIR/<scenario>/returned.json. tests/test_distributed.py
compares them.
All scenarios run in one process group, so a launch pays the start-up (imports, gloo) once.

With SIGTERM_RANK_1_AT_STEP=N only the named scenario runs, through the scripts' entry point
(`runs.cli.run`), and the process of rank 1 alone sends itself SIGTERM while step N runs: every
rank must stop at the same step with one checkpoint, and the script exits 143 with its resume
command (tests/test_distributed.py runs that command under torchrun).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "examples")]

# name -> (example module, extra flags); each runs with and without gradient checkpointing
SCENARIOS = {
    "lora": ("finetune_llm_lora", []),
    "qlora": ("finetune_llm_lora", ["--load_in_4bit", "true"]),
    "full": ("full_finetune", ["--learning_rate", "1e-3", "--llrd_decay", "0.8"]),
    "dpo": ("dpo", ["--dpo_dataset_path", str(REPO / "data/preference_demo.jsonl")]),
}
# 4 steps without warmup: every logged loss after the first follows an optimizer update at a
# nonzero learning rate (with the default fractional warmup step 1 ran at LR 0, and DPO's first
# two losses were both ln 2), so the 1- vs 2-process comparison covers three real updates.
STEPS = 4


def sigterm_rank_1_at(module, step: int) -> None:
    """Make the example's trainer send rank 1 a real SIGTERM while optimizer step `step` runs."""
    import os
    import signal

    from transformers import TrainerCallback

    class SigtermRank1(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step - 1 and args.process_index == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    original = module.build_sft_trainer
    module.build_sft_trainer = lambda *a, **k: original(*a, **{**k, "callbacks": list(k["callbacks"]) + [SigtermRank1()]})


def main(model_dir: str, out_dir: str, micro_batch: str, only: list[str]) -> None:
    import importlib
    import os

    from runs import cli, processes

    for name, (module, flags) in SCENARIOS.items():
        for checkpointing in ("false", "true"):
            scenario = f"{name}-gc" if checkpointing == "true" else name
            if only and scenario not in only:
                continue
            run_dir = Path(out_dir) / scenario
            example = importlib.import_module(module)
            argv = [
                "--base_model_name", model_dir, "--output_dir", str(run_dir),
                "--dataset_path", str(REPO / "data/identity_demo.jsonl"),
                "--max_steps", str(STEPS), "--warmup_steps", "0", "--logging_steps", "1", "--eval_steps", "2",
                "--per_device_train_batch_size", micro_batch, "--per_device_eval_batch_size", "3",
                "--lora_dropout", "0", "--gradient_checkpointing", checkpointing, *flags,
            ]
            if os.environ.get("SIGTERM_RANK_1_AT_STEP"):
                sigterm_rank_1_at(example, int(os.environ["SIGTERM_RANK_1_AT_STEP"]))
                cli.run(example.main, argv)  # exits 143 after the checkpoint
            summary = example.main(argv)
            if processes.is_main():
                (run_dir / "returned.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
