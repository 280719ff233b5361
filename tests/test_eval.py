"""Eval figures are exact over the whole eval set: the same at every eval batch size, and equal to
the value computed by hand (SFT: mean cross-entropy per supervised token; DPO: means over pairs).

The stock trainers average per-batch means with equal weights, so a short last batch counts as much
as a full one. On this file's data the token mean is 5.96297; batch means averaged equally give
5.93932 at eval batch 2 and 5.92459 at 4, and weighted by examples 5.95861 at batch 1 and 5.95074
at 4. techniques/training.py weights each batch by what it averages over (supervised tokens).
"""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
import torch.nn.functional as F

from config import Settings, get_settings
from data.examples import build_sft_example
from models import load_model, load_tokenizer
from techniques.dpo import build_dpo_trainer, build_preference_dataset, load_policy
from techniques.lora import apply_lora
from techniques.sft import build_sft_trainer, perplexity
from tests.tiny_model import make_tiny_model_dir

# Answers of very different lengths, so batch means differ from the token mean.
CONVERSATIONS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [
        ("Hi", "Hello!"),
        ("What is two plus two?", "It is four, and the question is about numbers and the quick brown fox."),
        ("Name a colour.", "Blue."),
        ("Tell me a joke about cats and dogs.", "The lazy dog jumps over the quick brown fox. The answer is 42."),
        ("Say yes.", "Yes."),
    ]
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("eval"))


def sft_setup(tiny, tmp_path, *flags):
    settings = get_settings(["--base_model_name", str(tiny), "--output_dir", str(tmp_path / "out"),
                             "--prompt_template", "chatml", "--lora_dropout", "0", *flags], env_file=None)
    tokenizer = load_tokenizer(settings, str(tiny))
    rows = [build_sft_example(c, tokenizer, "chatml", 512) for c in CONVERSATIONS]
    data = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "attention_mask", "labels")})
    model = apply_lora(load_model(settings, str(tiny)), settings)
    with torch.no_grad():  # a non-trivial adapter, so the figures are not the base model's
        gen = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return settings, tokenizer, datasets.DatasetDict(train=data, eval=data), model, rows


def hand_token_mean(model, rows) -> float:
    """Sum of next-token cross-entropies over every supervised position / their count."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = labels[1:]
            keep = targets != -100
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


@pytest.mark.parametrize("packing", [False, True])
def test_sft_eval_loss_is_the_token_mean_at_every_eval_batch_size(tiny, tmp_path, packing):
    settings, tokenizer, data, model, rows = sft_setup(tiny, tmp_path, "--packing", str(packing).lower())
    expected = hand_token_mean(model, rows)
    supervised = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    for batch in (1, 2, len(rows)):
        trainer = build_sft_trainer(model, tokenizer, data, settings, per_device_eval_batch_size=batch)
        metrics = trainer.evaluate()
        assert metrics["eval_loss"] == pytest.approx(expected, abs=1e-5), batch
        assert metrics["eval_weight"] == supervised
    assert perplexity(metrics["eval_loss"]) == pytest.approx(math.exp(expected), rel=1e-5)


def test_the_unweighted_mean_of_batch_means_would_differ(tiny, tmp_path):
    """The fault this guards against is real on this data: batch means averaged equally at eval
    batch 2 ([a, b], [c, d], [e]) are off the token mean by far more than the tolerance."""
    settings, tokenizer, data, model, rows = sft_setup(tiny, tmp_path)
    batch_means = [hand_token_mean(model, rows[i:i + 2]) for i in range(0, len(rows), 2)]
    assert abs(sum(batch_means) / len(batch_means) - hand_token_mean(model, rows)) > 1e-3


PAIRS = [{"prompt": f"What is {n} times 2?", "chosen": str(2 * n) if n % 3 else f"It is {2 * n}, I am sure.",
          "rejected": f"${2 * n}" if n % 2 else "I do not know, sorry."} for n in range(17, 24)]


def test_dpo_eval_metrics_are_means_over_pairs_at_every_eval_batch_size(tiny, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    settings = get_settings(["--base_model_name", str(tiny), "--dpo_dataset_path", str(data),
                             "--dpo_eval_dataset_path", str(data), "--prompt_template", "chatml",
                             "--output_dir", str(tmp_path / "out"), "--lora_dropout", "0", "--beta", "0.5"], env_file=None)
    tokenizer = load_tokenizer(settings, str(tiny))
    splits = build_preference_dataset(settings, tokenizer)

    def trainer_for(eval_batch):
        """A trainer whose policy has moved away from its reference (the adapter disabled), as
        training would move it: the adapter is changed after TRL has set the reference up."""
        torch.manual_seed(0)  # the same LoRA A init in every trainer
        trainer = build_dpo_trainer(load_policy(settings, str(tiny)), tokenizer, splits["train"], splits["eval"],
                                    settings, per_device_eval_batch_size=eval_batch)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for name, param in trainer.model.named_parameters():
                if "lora_B.default" in name:  # not TRL's frozen "ref" copy
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        assert "ref" not in trainer.model.peft_config or not any(
            "lora_B.ref" in n and p.abs().sum() > 0 for n, p in trainer.model.named_parameters())
        return trainer

    # by hand: summed log-probs of each answer under the policy and under the base (adapter off)
    def logps(model, pair):
        out = []
        for answer in ("chosen_ids", "rejected_ids"):
            ids = pair["prompt_ids"] + pair[answer]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            out.append(sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(len(pair["prompt_ids"]), len(ids))))
        return out

    policy = trainer_for(1).model.eval()
    rows = [splits["eval"][i] for i in range(len(splits["eval"]))]
    pol = [logps(policy, row) for row in rows]
    with policy.disable_adapter():  # the reference: the base (TRL's "ref" copy of a B = 0 adapter is the same)
        ref = [logps(policy, row) for row in rows]
    chosen = [0.5 * (p[0] - r[0]) for p, r in zip(pol, ref, strict=True)]
    rejected = [0.5 * (p[1] - r[1]) for p, r in zip(pol, ref, strict=True)]
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    expected = {
        "eval_loss": sum(-F.logsigmoid(torch.tensor(m)).item() for m in margins) / len(rows),
        "eval_rewards/chosen": sum(chosen) / len(rows),
        "eval_rewards/margins": sum(margins) / len(rows),
        "eval_rewards/accuracies": sum(m > 0 for m in margins) / len(rows),
    }
    assert 0 < expected["eval_rewards/accuracies"] < 1  # a mix, so the weighting matters

    for batch in (1, 3, len(rows)):
        metrics = trainer_for(batch).evaluate()
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, abs=1e-4), (batch, key)
        assert metrics["eval_weight"] == len(rows)
