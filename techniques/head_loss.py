"""The SFT loss with the LM head run on the supervised positions only.

TRL 1.16's `SFTTrainer` scores its fused LM head on the supervised positions only on Triton
devices (CUDA GPUs); everywhere else (CPU) it projects *every* position through the head, in
chunks, and computes log-probs, entropy, top-1 and two more statistics for each: on the default
model (49,152-token vocabulary) on a 2-core CPU that was ~60% of a LoRA step (bench/, README
"Performance"). Here the head sees only the rows `labels[:, 1:] != -100` selects, and the loss is
torch's fused `cross_entropy` over them:

    loss = sum_i CE(head(h_i), y_i) / n        i over supervised positions (label != -100),
                                               n = num_items_in_batch (every process's supervised
                                               tokens in the optimizer step) or the batch's own count

the same value and gradient as TRL's loss (TRL `SFTTrainer.compute_loss`, `loss_type="nll"`),
with DDP's scaling kept (`average_tokens_across_devices`). The head runs through the wrapped model
(a forward pre-hook on the output embeddings selects the rows for the duration of one call), so
DDP, FSDP and DeepSpeed see their own forward as usual.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput


@contextmanager
def head_on_rows(model: torch.nn.Module, rows: torch.Tensor):
    """While inside, the output embeddings (LM head) of `model` take `hidden[:, :-1][rows]`
    instead of `hidden` (batch, seq, d): they return (n, vocab) logits for the n selected positions.

    `rows` is a bool tensor (batch, seq - 1): position t predicts token t + 1.
    """
    head = model.get_output_embeddings()

    def select(_module, args):
        hidden = args[0]
        return (hidden[:, :-1][rows.to(hidden.device)],)

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


class SupervisedHeadLossMixin:
    """`compute_loss` for SFT trainers (put it before `SFTTrainer` in the bases): the LM head on
    supervised positions only (module docstring). Logs TRL's `entropy`, `mean_token_accuracy` and
    `num_tokens` as TRL does. Options this loss does not implement (a `compute_loss_func`, label
    smoothing, `loss_type="dft"`, MoE aux loss, sequence parallelism) go to TRL's own loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parallel = getattr(self.accelerator, "parallelism_config", None)
        if (self.compute_loss_func is not None or self.label_smoother is not None or self.args.loss_type != "nll"
                or self.aux_loss_enabled or (parallel is not None and getattr(parallel, "sp_enabled", False))):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        targets = inputs["labels"][:, 1:]
        rows = targets != -100
        forward = {key: value for key, value in inputs.items() if key != "labels"}
        with head_on_rows(self.accelerator.unwrap_model(model), rows):
            logits = model(**forward, use_cache=False).logits  # (n, vocab)
        chosen = targets[rows]
        # cross_entropy = nll_loss(log_softmax) (as torch computes it), with the log-probs kept
        # for the logged metrics: one log-softmax over (n, vocab) per step instead of two.
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        total = F.nll_loss(log_probs, chosen, reduction="sum")
        count = rows.sum() if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; n counts every process
        self._log_head_metrics(mode, log_probs.detach(), chosen, inputs)
        return (loss, CausalLMOutput(loss=loss)) if return_outputs else loss

    def _log_head_metrics(self, mode: str, log_probs: torch.Tensor, chosen: torch.Tensor, inputs: dict) -> None:
        """TRL's per-step metrics from the supervised log-probs (n, vocab) fp32: mean entropy,
        top-1 accuracy (argmax of the log-probs = of the logits), tokens."""
        gather = self.accelerator.gather_for_metrics
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1).sum()
            correct = (log_probs.argmax(-1) == chosen).sum()
            valid = gather(torch.tensor(chosen.numel(), device=log_probs.device)).sum()
            entropy, correct = gather(entropy).sum(), gather(correct).sum()
        self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":  # TRL's count of input tokens (padding excluded), every process
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += gather(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
