"""The numbers an example prints before and after training: held-out answers, the first and final evals."""

from __future__ import annotations

from typing import Callable

from transformers import TrainerCallback

from config import Settings
from data.readers import held_out_prompt, load_conversation_splits
from inference import generate_replies
from runs.processes import is_main, sharded_weights


def held_out_prompts(settings: Settings, n: int) -> list[tuple[list[dict], list[dict] | None]]:
    """The first `n` eval conversations cut before their last assistant turn, each with the tool
    list its record offers (None without tools): (messages, tools)."""
    eval_split = load_conversation_splits(settings).get("eval", [])[:n]
    return [(held_out_prompt(conversation.messages)[0], conversation.tools) for conversation in eval_split]


def question(messages: list[dict]) -> str:
    """The last user turn of a held-out prompt, to print next to its answer."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def held_out_answers(model, tokenizer, held_out: list[tuple[list[dict], list[dict] | None]], template: str,
                     trainer=None, max_length: int | None = None) -> list[str] | str:
    """Greedy answers to `held_out` (from `held_out_prompts`; each prompt offered its own tools),
    generated on the main process alone (the others get []).

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
    answers, start = [], 0
    while start < len(held_out):  # one batch per run of prompts that share a tool list
        end = start + 1
        while end < len(held_out) and held_out[end][1] == held_out[start][1]:
            end += 1
        prompts = [messages for messages, _ in held_out[start:end]]
        answers += generate_replies(model, tokenizer, prompts, template, tools=held_out[start][1], max_length=max_length)
        start = end
    return answers


def first_eval(trainer) -> dict:
    """The metrics of the evaluation before the first step (`eval_on_start`), or {}."""
    return next((e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == 0), {})


def final_eval(trainer) -> dict:
    """The eval metrics of the trained model: those of the trainer's own evaluation at the last
    step when it ran one (EVAL_STEPS divides the step count), else a new `trainer.evaluate()`.

    Both cover `trainer.eval_dataset` (a key `eval_loss`, not `eval_<name>_loss` of a named set)
    with the same final weights, so evaluating again would only print the same line twice and log
    a second eval row at that step in metrics.jsonl and TensorBoard. Every process holds the same
    log history, so all of them skip the collective `evaluate()` together.
    """
    state = trainer.state
    last = next((entry for entry in reversed(state.log_history) if "eval_loss" in entry), None)
    if last is not None and state.global_step > 0 and last["step"] == state.global_step:
        return {key: value for key, value in last.items() if key != "step"}
    return trainer.evaluate()


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
