"""Packing: several examples in one row must behave exactly like each example alone.

Checked on a tiny random Llama for both attention kernels used on CPU (sdpa, eager): logits and the
summed loss of a packed row equal those of the examples run one by one, and a naive pack (plain
causal mask over the row) does not, so the comparison can fail. Then the trainer that
techniques/sft.py builds with `packing=true` is checked to feed exactly such rows.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from config import get_settings
from data.dataset import build_sft_dataset_with_report
from data.examples import IGNORE_INDEX
from models import load_model, load_tokenizer
from techniques.sft import build_sft_trainer, sft_config
from tests.tiny import make_model, make_tokenizer, one_torch_thread
from tests.tiny_model import make_tiny_model_dir

ATTENTION = ["sdpa", "eager"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():  # tiny models: see tests/tiny.py
        yield


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions (labels shifted as HF models do)."""
    return F.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.size(-1)), labels[..., 1:].reshape(-1), reduction="sum"
    )


@pytest.fixture(scope="module")
def two_examples():
    tokenizer = make_tokenizer("chatml")
    a = {"input_ids": [5, 17, 42], "labels": [IGNORE_INDEX, 17, 42]}  # 3 tokens
    b = {"input_ids": [9, 23, 77, 31, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 77, 31, 8]}  # 5 tokens
    return tokenizer, a, b


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_row_equals_each_example_alone(two_examples, attn):
    tokenizer, a, b = two_examples
    model = make_model(tokenizer, attn_implementation=attn)
    # the collator the trainer uses with packing: one row, position ids restarting, no attention mask
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([a, b])
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]] and "attention_mask" not in packed
    assert packed["labels"][0, 3].item() == IGNORE_INDEX  # b's first token is never a target of a's last
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits for e in (a, b)]
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        naive = model(input_ids=packed["input_ids"], use_cache=False).logits  # positions 0..7, plain causal mask
        cached = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits

    torch.testing.assert_close(together, torch.cat(alone, dim=1), atol=1e-5, rtol=0)
    separate = sum(summed_loss(lg, torch.tensor([e["labels"]])) for lg, e in zip(alone, (a, b), strict=True))
    torch.testing.assert_close(summed_loss(together, packed["labels"]), separate, atol=1e-5, rtol=0)
    # the test can fail: b attends to a under a plain causal mask, and with a KV cache transformers
    # does not build the block-diagonal mask at all (why TRL forces use_cache=False)
    assert not torch.allclose(naive[:, 3:], alone[1], atol=1e-3)
    assert not torch.allclose(cached[:, 3:], alone[1], atol=1e-3)
    torch.testing.assert_close(naive[:, :3], alone[0], atol=1e-5, rtol=0)  # a comes first: it sees nothing else


def test_first_token_of_next_example_would_be_a_target_without_the_collator_mask(two_examples):
    tokenizer, a, b = two_examples
    model = make_model(tokenizer)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([a, b])
    leaky = packed["labels"].clone()
    leaky[0, 3] = b["input_ids"][0]  # what concatenating labels without masking example starts gives
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    assert summed_loss(logits, leaky) > summed_loss(logits, packed["labels"]) + 1e-3


# --------------------------------------------------------------------------------------------
# The trainer techniques/sft.py builds
# --------------------------------------------------------------------------------------------

RECORDS = [
    {"instruction": "Say hi.", "output": "Hi."},
    {"instruction": "What is two plus two?", "output": "The answer is 4."},
    {"instruction": "Tell me a joke about cats and dogs.", "output": "Cats and dogs."},
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Give three tips for staying healthy.", "output": "Sleep, eat well, walk."},
    {"instruction": "Translate the sentence into French.", "output": "Bonjour."},
]


def packed_trainer(tmp_path, attn: str, *flags: str):
    model_dir = make_tiny_model_dir(tmp_path)
    data_path = tmp_path / "train.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    settings = get_settings(
        [
            "--base_model_name", str(model_dir), "--dataset_path", str(data_path), "--prompt_template", "chatml",
            "--max_seq_length", "128", "--eval_split_size", "0", "--per_device_train_batch_size", "2",
            "--mixed_precision", "no", "--output_dir", str(tmp_path / "out"), "--attn_implementation", attn,
            "--packing", "true", *flags,
        ],
        env_file=None,
    )
    tokenizer = load_tokenizer(settings, model_dir)
    data, report = build_sft_dataset_with_report(settings, tokenizer)
    model = load_model(settings, model_dir, dtype=torch.float32)
    return build_sft_trainer(model, tokenizer, data, settings), data, report, tokenizer


@pytest.mark.parametrize("attn", ATTENTION)
def test_trainer_with_packing_feeds_restarting_position_ids_and_isolated_examples(tmp_path, attn):
    trainer, data, report, tokenizer = packed_trainer(tmp_path, attn)
    assert trainer.model.config._attn_implementation == attn
    train = report.splits["train"]
    assert trainer.train_dataset.num_rows == train.packed_rows < train.kept  # rows hold several examples
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch  # without one, transformers derives the mask from position ids
    positions, ids, labels = batch["position_ids"][0], batch["input_ids"][0], batch["labels"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) > 2  # 2 packed rows, each of several examples, concatenated
    by_ids = {tuple(row["input_ids"]): row["labels"] for row in data["train"]}
    for start, end in zip(starts, starts[1:] + [len(positions)], strict=True):
        assert positions[start:end].tolist() == list(range(end - start))  # restart at 0 per example
        assert labels[start].item() == IGNORE_INDEX
        assert labels[start:end].tolist() == by_ids[tuple(ids[start:end].tolist())]  # whole examples, own labels

    # the loss the trainer computes on the packed batch equals that of the same examples padded
    examples = [
        {"input_ids": ids[s:e].tolist(), "labels": labels[s:e].tolist()}
        for s, e in zip(starts, starts[1:] + [len(positions)], strict=True)
    ]
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    naive = {k: v for k, v in batch.items() if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")}
    naive = {**naive, "position_ids": torch.arange(len(positions))[None]}
    with torch.no_grad():
        packed_loss = trainer.compute_loss(trainer.model, dict(batch))
        padded_loss = trainer.compute_loss(trainer.model, padded)
        naive_loss = trainer.compute_loss(trainer.model, naive)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=0)
    assert abs(naive_loss - padded_loss) > 1e-4  # a plain causal mask over the row would leak

    # the dataset report counts the rows the trainer packed
    assert train.packing_efficiency == pytest.approx(train.total_tokens / (train.packed_rows * 128))
    table = report.format()
    assert "packing=true" in table and "packed_rows" in table and "packing_efficiency" in table
    assert f"{train.packing_efficiency:.3f}" in table.splitlines()[2]


def test_trainer_trains_with_packing(tmp_path):
    trainer, *_ = packed_trainer(tmp_path, "sdpa", "--max_steps", "2", "--logging_steps", "1")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_packing_is_off_by_default_and_the_trainer_then_pads():
    settings = get_settings([], env_file=None)
    config = sft_config(settings)
    assert settings.packing is False and config.packing is False and config.padding_free is False
    assert config.max_length is None  # examples arrive truncated by the builder's documented rule
