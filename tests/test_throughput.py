"""Speed figures in every training log: FLOPs per token by hand, token counts of real batches,
peak FLOP/s sources, and a tiny run whose totals equal the dataset report's."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from config import get_settings
from data.dataset import build_sft_dataset_with_report
from models import load_model, load_tokenizer
from techniques import throughput
from techniques.lora import apply_lora
from techniques.sft import build_sft_trainer
from tests.tiny_model import TINY_CONFIG, make_tiny_model_dir

D, F, L = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"], TINY_CONFIG["num_hidden_layers"]
KV = D // TINY_CONFIG["num_attention_heads"] * TINY_CONFIG["num_key_value_heads"]
LAYER_WEIGHTS = D * D + 2 * D * KV + D * D + 3 * D * F  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("speed"))


def settings(tiny, tmp_path, *flags):
    return get_settings(["--base_model_name", str(tiny), "--output_dir", str(tmp_path / "out"), "--lora_dropout", "0",
                         *flags], env_file=None)


def test_flops_per_token_full_lora_and_reference_by_hand(tiny, tmp_path):
    s = settings(tiny, tmp_path, "--lora_r", "4")
    full = load_model(s, str(tiny), dtype=torch.float32)
    vocab = full.get_output_embeddings().weight.shape[0]
    counted = throughput.flops_per_token(full)
    assert counted.per_token == 6 * L * LAYER_WEIGHTS
    assert counted.per_supervised_token == 6 * vocab * D  # the (tied) head trains
    assert counted.attention == 12 * L * D

    lora = apply_lora(load_model(s, str(tiny)), s)
    adapter = sum(p.numel() for n, p in lora.named_parameters() if p.requires_grad)
    counted = throughput.flops_per_token(lora)
    assert counted.per_token == 4 * L * LAYER_WEIGHTS + 6 * adapter  # frozen base: no weight gradient
    assert counted.per_supervised_token == 4 * vocab * D

    with_ref = throughput.flops_per_token(lora, forward_only=full)
    assert with_ref.per_token == counted.per_token + 2 * L * LAYER_WEIGHTS
    assert with_ref.attention == 12 * L * D + 4 * L * D


def test_batch_token_counts_padded_and_padding_free():
    padded = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5]),
              "labels": torch.tensor([[-100, 7, 8, -100, -100], [-100, -100, 3, 4, 5]])}
    assert throughput.batch_token_counts(padded) == (8, 5, 3 * 3 + 5 * 5)
    packed = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]),
              "labels": torch.tensor([[-100, 5, 6, -100, 1, 2, 3, 4]])}
    assert throughput.batch_token_counts(packed) == (8, 6, 3 * 3 + 5 * 5)
    dpo = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
           "completion_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])}
    assert throughput.batch_token_counts(dpo) == (8, 3, 32)


def test_peak_flops_from_the_setting_the_gpu_table_and_a_cached_cpu_measurement(tmp_path, monkeypatch):
    assert throughput.peak_flops(torch.device("cpu"), torch.float32, 1.5e12) == 1.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert throughput.peak_flops(torch.device("cuda"), torch.bfloat16) == 989e12
    assert throughput.peak_flops(torch.device("cuda"), torch.float32) == 67e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert throughput.peak_flops(torch.device("cuda"), torch.bfloat16) is None
    cache = tmp_path / "peak.json"
    monkeypatch.setattr(throughput, "CPU_PEAK_CACHE", cache)
    rng = torch.get_rng_state()
    measured = throughput.measured_cpu_peak_flops(torch.float32, size=256, repeats=2)
    assert torch.equal(torch.get_rng_state(), rng)  # measuring mid-training must not move the dropout masks
    assert 1e8 < measured < 1e14 and cache.is_file()
    (key, kept), = json.loads(cache.read_text()).items()
    assert kept == measured
    # A figure measured on a busy machine (low) is replaced by the next higher one; a higher one stays.
    cache.write_text(json.dumps({key: 1.0}))
    assert throughput.measured_cpu_peak_flops(torch.float32, size=256, repeats=2) > 1e8
    assert json.loads(cache.read_text())[key] > 1e8
    cache.write_text(json.dumps({key: 1e15}))
    assert throughput.measured_cpu_peak_flops(torch.float32, size=256, repeats=2) == 1e15


def test_mfu_never_exceeds_one_when_the_measured_peak_was_low(tiny, tmp_path, monkeypatch):
    """A peak measured while other jobs held the cores made the demo log MFU 105%: the achieved
    rate then replaces it (MFU 1 for that interval, not above)."""
    monkeypatch.setattr(throughput, "peak_flops", lambda device, dtype, setting=None: 1.0)  # 1 FLOP/s "peak"
    s = settings(tiny, tmp_path, "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
                 "--eval_split_size", "0")
    tokenizer = load_tokenizer(s, str(tiny))
    data, _ = build_sft_dataset_with_report(s, tokenizer)
    trainer = build_sft_trainer(apply_lora(load_model(s, str(tiny)), s), tokenizer, data, s)
    trainer.train()
    mfus = [row["mfu"] for row in trainer.state.log_history if "mfu" in row]
    assert len(mfus) == 2 and mfus[0] == pytest.approx(1.0) and 0 < mfus[1] <= 1.0 + 1e-9
    assert trainer._peak > 1e6  # raised to what the first step achieved


def test_every_training_log_has_speed_and_the_totals_are_the_dataset(tiny, tmp_path):
    """One epoch at batch 4 over the 98 demo examples: the run's token totals equal the report's."""
    s = settings(tiny, tmp_path, "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
                 "--logging_steps", "5", "--eval_split_size", "0", "--peak_flops", "1e12")
    tokenizer = load_tokenizer(s, str(tiny))
    data, report = build_sft_dataset_with_report(s, tokenizer)
    trainer = build_sft_trainer(apply_lora(load_model(s, str(tiny)), s), tokenizer, data, s)
    trainer.train()
    steps = [row for row in trainer.state.log_history if "loss" in row]
    assert len(steps) == 5 and all(row["tokens_per_s"] > row["supervised_tokens_per_s"] > 0 for row in steps)
    assert all(0 < row["mfu"] < 1 and row["peak_mem_gib"] > 0 for row in steps)
    final = trainer.state.log_history[-1]
    assert final["train_tokens"] == report.splits["train"].total_tokens
    assert final["train_supervised_tokens"] == report.splits["train"].supervised_tokens
    flops = throughput.flops_per_token(trainer.model)
    squared = sum(len(ids) ** 2 for ids in data["train"]["input_ids"])
    expected = flops.step_flops(final["train_tokens"], final["train_supervised_tokens"], squared) / final["train_seconds"] / 1e12
    assert final["train_mfu"] == pytest.approx(expected, rel=1e-9)
    assert final["train_supervised_tokens_per_s"] == pytest.approx(final["train_supervised_tokens"] / final["train_seconds"])
