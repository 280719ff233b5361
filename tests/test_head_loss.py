"""The SFT loss with the LM head on supervised positions only (techniques.head_loss) equals TRL's
own loss in value and gradient, and the head is run on exactly the supervised rows."""

from __future__ import annotations

import pytest
import torch
from trl import SFTTrainer

from config import get_settings
from data.dataset import build_sft_dataset_with_report
from models import load_model, load_tokenizer
from techniques.lora import apply_lora
from techniques.sft import build_sft_trainer
from tests.tiny_model import make_tiny_model_dir


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("head")
    tiny = make_tiny_model_dir(tmp)
    s = get_settings(["--base_model_name", str(tiny), "--output_dir", str(tmp / "out"), "--lora_dropout", "0",
                      "--eval_split_size", "0", "--per_device_train_batch_size", "4"], env_file=None)
    tokenizer = load_tokenizer(s, str(tiny))
    data, _ = build_sft_dataset_with_report(s, tokenizer)
    return build_sft_trainer(apply_lora(load_model(s, str(tiny), dtype=torch.float32), s), tokenizer, data, s)


def loss_and_grads(trainer, compute_loss, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = compute_loss(trainer, model, dict(batch))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, 57])
def test_loss_and_gradients_equal_trls(trainer, num_items):
    batch = next(iter(trainer.get_train_dataloader()))
    ours = lambda t, m, b: type(t).compute_loss(t, m, b, num_items_in_batch=num_items)  # noqa: E731
    trls = lambda t, m, b: SFTTrainer.compute_loss(t, m, b, num_items_in_batch=num_items)  # noqa: E731
    (loss, grads), (trl_loss, trl_grads) = loss_and_grads(trainer, ours, batch), loss_and_grads(trainer, trls, batch)
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < supervised < batch["labels"].numel()  # prompts and padding are not supervised
    assert loss == pytest.approx(trl_loss, rel=1e-5) and loss > 1.0
    assert max((grads[n] - trl_grads[n]).abs().max().item() for n in grads) < 1e-6 * max(g.abs().max().item() for g in grads.values()) + 1e-9


def test_the_head_sees_only_supervised_rows_and_trls_metrics_are_logged(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    seen = []
    head = trainer.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            trainer.compute_loss(trainer.model, dict(batch))
    finally:
        handle.remove()
    vocab = head.weight.shape[0]
    assert seen == [(int((batch["labels"][:, 1:] != -100).sum()), vocab)]
    metrics = trainer._metrics["train"]
    assert 0 <= metrics["mean_token_accuracy"][-1] <= 1 and 0 < metrics["entropy"][-1] <= torch.log(torch.tensor(vocab))
    assert "attention_mask" not in batch  # padding-free (the default): every token is real
    assert metrics["num_tokens"][-1] >= batch["input_ids"].numel()
