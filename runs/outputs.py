"""What a run leaves in its output_dir: metrics.jsonl, and the final folder written collectively."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import GenerationConfig, TrainerCallback

from config import Settings, save_settings
from data.chat_templates import chat_template_for
from data.templates import stop_token_ids
from runs.processes import is_main
from techniques.checkpoints import replace_dir


class MetricsLog(TrainerCallback):
    """Appends every log event (train steps, evaluations) as one JSON line to `path`, on the main
    process: `{"step": 5, "epoch": 0.38, "loss": 5.92, "learning_rate": 0.0009, ...}`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A resumed run (state loaded at step N > 0) keeps the lines its checkpoint covers;
            # lines an interrupted run logged after its last checkpoint are logged again.
            kept = [line for line in self._lines() if json.loads(line)["step"] <= state.global_step] if state.global_step else []
            self.path.write_text("".join(line + "\n" for line in kept))

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.is_file() else []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def save_final(trainer, tokenizer, settings: Settings, final_dir: str | Path) -> Path:
    """Write the trained model (adapter or full weights), tokenizer, generation config and settings
    to `final_dir`; call it on every process.

    The tokenizer's chat template becomes the training template (`chat_template_for`, with the run's
    system prompt as its default system turn), so servers that render with the tokenizer prompt
    the model token for token as it learned. The generation config stops on
    every stop id of the template (eos + turn end). Settings are saved without secrets. Weights go
    through `trainer.save_model`, collective under FSDP and ZeRO-3. Everything is written to a
    temporary sibling folder first and renamed into place by the main process once complete, so a
    `final_dir` that exists is whole. DPO's frozen reference adapter ("ref") is not kept.
    """
    final_dir = Path(final_dir)
    partial = final_dir.parent / f".{final_dir.name}.partial"
    tokenizer.chat_template = chat_template_for(settings.prompt_template, tokenizer, settings.system_prompt)
    if is_main():
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(partial))
    if is_main():
        shutil.rmtree(partial / "ref", ignore_errors=True)  # TRL's frozen copy of a re-trained adapter
        save_generation_config(tokenizer, settings, partial)
        save_settings(settings, partial / "run_settings.json")
        replace_dir(partial, final_dir)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def save_generation_config(tokenizer, settings: Settings, folder: str | Path) -> None:
    """A generation config that stops on every stop id of the template (eos + turn end)."""
    GenerationConfig(eos_token_id=stop_token_ids(settings.prompt_template, tokenizer),
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
