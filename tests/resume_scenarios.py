"""Interrupt and resume every example on a tiny model, recording what each optimizer step saw.

    python tests/resume_scenarios.py MODEL_DIR OUT_DIR first    # run A (12 steps) and run B (SIGTERM in step 8)
    python tests/resume_scenarios.py MODEL_DIR OUT_DIR resume   # a fresh process: B's printed resume command

For each scenario, `first` runs A = the example for 12 optimizer steps, then B = the same command,
which sends itself a real SIGTERM during step 8: the example saves checkpoint-8, stops and raises
Interrupted with the resume command, written to OUT_DIR/<scenario>/B/interrupted.txt. `resume`
runs that command's flags through the example's main() (the script named in it), so the resumed
run starts from the files alone. Every run records, per optimizer step, the example ids of its
micro batches and every optimizer group's LR (record.json); a resumed run also saves the optimizer
and scheduler state it starts from and, for DPO, its reference adapter (resumed_state.pt).
tests/test_resume.py compares them.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "examples")]

STEPS, STOP_AT = 12, 8
# The SFT data: 40 records, 8 per optimizer step (4 micro x 2 accumulation) = 5 steps per epoch,
# so step 8 lies inside the second epoch and step 12 inside the third. Batches are length-grouped
# (GROUP_BY_LENGTH), whose order per epoch must not depend on the RNG state at resume; random
# batches (the default) are resumed by transformers' own seeded sampler.
SFT_FLAGS = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--eval_split_size", "0",
             "--group_by_length", "true"]
SCENARIOS = {
    "lora": ("finetune_llm_lora", SFT_FLAGS + ["--save_total_limit", "2", "--lora_dropout", "0.05"]),
    "qlora": ("finetune_llm_lora", SFT_FLAGS + ["--load_in_4bit", "true", "--lora_dropout", "0.05"]),
    "full": ("full_finetune", SFT_FLAGS + ["--learning_rate", "1e-3", "--llrd_decay", "0.8", "--weight_decay", "0.01"]),
    # continues lora's trained adapter: the reference is TRL's frozen copy of it ("ref"), not the base
    "dpo": ("dpo", ["--per_device_train_batch_size", "2", "--eval_split_size", "0", "--beta", "0.5"]),
}
RECORDS: dict[str, dict] = {}  # output_dir -> what its run saw


def install_recorder() -> None:
    """Wrap both trainers' training_step: record example ids and LRs; on a resumed run's first
    step save the optimizer / scheduler state it starts from (and DPO's reference adapter)."""
    import torch

    from techniques.dpo import PreTokenizedDPOTrainer
    from techniques.sft import Trainer

    for cls in (Trainer, PreTokenizedDPOTrainer):
        original = cls.training_step

        def training_step(self, model, inputs, num_items_in_batch=None, _original=original):
            record = RECORDS.setdefault(str(Path(self.args.output_dir).resolve()), {"batches": {}, "lrs": {}})
            step = self.state.global_step + 1
            if "resumed_from" not in record:
                record["resumed_from"] = self.state.global_step
                record["checkpoints_at_start"] = sorted(p.name for p in Path(self.args.output_dir).glob("checkpoint-*"))
                if self.state.global_step:
                    ref = {n.replace(".ref.", "."): p.detach().clone() for n, p in self.model.named_parameters() if ".ref." in n}
                    torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict(),
                                "ref": ref}, Path(self.args.output_dir) / "resumed_state.pt")
            record["batches"].setdefault(step, []).extend(example_ids(self, inputs))
            record["lrs"][step] = [group["lr"] for group in self.optimizer.param_groups]
            return _original(self, model, inputs, num_items_in_batch)

        cls.training_step = training_step


def example_ids(trainer, inputs) -> list[int]:
    """The train-dataset index of every example in a micro batch (rows unpadded by attention_mask, or
    split at the position ids' restarts when padding-free; DPO batches stack the chosen rows first)."""
    if not hasattr(trainer, "_row_index"):
        data = trainer.train_dataset
        if "prompt_ids" in data.column_names:
            rows = [tuple(p + c) for p, c in zip(data["prompt_ids"], data["chosen_ids"], strict=True)]
        else:
            rows = [tuple(ids) for ids in data["input_ids"]]
        trainer._row_index = {}
        for i, row in enumerate(rows):
            trainer._row_index.setdefault(row, i)
    if "attention_mask" not in inputs:  # a padding-free SFT batch: one row, its examples one after another
        from attention import example_bounds

        row, bounds = inputs["input_ids"][0], example_bounds(inputs["position_ids"][0])
        return [trainer._row_index[tuple(row[s:e].tolist())] for s, e in zip(bounds[:-1], bounds[1:])]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n = ids.shape[0] // 2 if "prompt_ids" in trainer.train_dataset.column_names else ids.shape[0]
    return [trainer._row_index[tuple(ids[i][mask[i].bool()].tolist())] for i in range(n)]


class SigtermInStep:
    """A callback that sends this process a real SIGTERM while optimizer step `step` runs."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == step - 1:
                    os.kill(os.getpid(), signal.SIGTERM)

        return _Callback()


def with_extra_callback(module, callback) -> None:
    """Make the example's trainer builder add `callback` (the examples take no callbacks from outside)."""
    builder_name = "build_dpo_trainer" if hasattr(module, "build_dpo_trainer") else "build_sft_trainer"
    original = getattr(module, builder_name)

    def build(*args, callbacks=None, **kwargs):
        return original(*args, callbacks=list(callbacks or []) + ([callback] if callback else []), **kwargs)

    setattr(module, builder_name, build)


def flags(name: str, model_dir: str, out: Path, data_dir: Path) -> list[str]:
    module, extra = SCENARIOS[name]
    data = ["--dpo_dataset_path", str(REPO / "data/preference_demo.jsonl"), "--sft_adapter_dir", str(out / "lora" / "A" / "final")] \
        if module == "dpo" else ["--dataset_path", str(data_dir / "sft40.jsonl")]
    return ["--base_model_name", model_dir, "--max_steps", str(STEPS), "--save_steps", "4", "--logging_steps", "1",
            "--seed", "7", *data, *extra]


def dump(run_dir: Path) -> None:
    record = RECORDS.get(str(run_dir.resolve()), {})
    (run_dir / "record.json").write_text(json.dumps(record))


def first(model_dir: str, out: Path) -> None:
    import importlib

    from runs.guards import Interrupted

    lines = (REPO / "data/identity_demo.jsonl").read_text().splitlines()[:40]
    (out / "sft40.jsonl").write_text("\n".join(lines) + "\n")
    for name, (module_name, _) in SCENARIOS.items():
        module = importlib.import_module(module_name)
        for run, callback in (("A", None), ("B", SigtermInStep(STOP_AT))):
            importlib.reload(module)
            with_extra_callback(module, callback)
            run_dir = out / name / run
            try:
                module.main(flags(name, model_dir, out, out) + ["--output_dir", str(run_dir)])
            except Interrupted as stop:
                left = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
                (run_dir / "interrupted.txt").write_text(json.dumps({"message": str(stop), "exit_code": stop.exit_code,
                                                                     "folders": left}))
            dump(run_dir)


def resume(out: Path) -> None:
    import importlib

    for name in SCENARIOS:
        run_dir = out / name / "B"
        message = json.loads((run_dir / "interrupted.txt").read_text())["message"]
        command = shlex.split(message.splitlines()[-1])
        script = next(i for i, part in enumerate(command) if part.endswith(".py"))
        module = importlib.reload(importlib.import_module(Path(command[script]).stem))
        RECORDS.pop(str(run_dir.resolve()), None)
        module.main(command[script + 1:])
        dump(run_dir)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # tiny-model math: thread hand-offs on a busy machine cost more than they save
    install_recorder()
    model_dir, out_dir, phase = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    out_dir.mkdir(parents=True, exist_ok=True)
    first(model_dir, out_dir) if phase == "first" else resume(out_dir)
