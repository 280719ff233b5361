"""The numbers an example prints before and after training: held-out answers, the first eval."""

from __future__ import annotations

from typing import Callable

from transformers import TrainerCallback

from config import Settings
from data.dataset import held_out_prompt, load_splits
from inference import generate_replies
from runs.processes import is_main, sharded_weights


def held_out_prompts(settings: Settings, n: int) -> list[list[dict]]:
    """The first `n` eval conversations, cut before their last assistant turn."""
    return [held_out_prompt(messages)[0] for messages in load_splits(settings).get("eval", [])[:n]]


def held_out_answers(model, tokenizer, held_out: list[list[dict]], template: str, trainer=None,
                     max_length: int | None = None) -> list[str] | str:
    """Greedy answers to `held_out`, generated on the main process alone (the others get []).

    Pass the `trainer` after training: when it has sharded the weights (FSDP, ZeRO-3) no single
    process holds the model, and the reason is returned instead of answers. Pass the run's
    max_seq_length as `max_length`: prompts longer than training rows are cut as they are
    (`inference.generate_replies`).
    """
    reason = sharded_weights(trainer) if trainer is not None else None
    if reason:
        return f"held-out answers skipped: {reason}; chat with the saved folder instead (examples/chat.py)"
    if not held_out or not is_main():
        return []
    return generate_replies(model, tokenizer, held_out, template, max_length=max_length)


def first_eval(trainer) -> dict:
    """The metrics of the evaluation before the first step (`eval_on_start`), or {}."""
    return next((e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == 0), {})


class OnFirstEvaluate(TrainerCallback):
    """Calls `report(metrics)` once, with the metrics of the evaluation that `eval_on_start=True`
    runs inside `train()` before the first step (the "before training" figures; when resuming,
    those at the checkpoint's step)."""

    def __init__(self, report: Callable[[dict], None]):
        self.report, self.done = report, False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.done:
            self.done = True
            self.report(dict(metrics or {}))
