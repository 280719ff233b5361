"""Large input stays bounded: a 200k-character record and a 50k-record file build in bounded time
and memory, and held-out prompts obey max_seq_length like training rows.

Measured on 2 cores shared with other jobs (peak = growth of the resident set's high-water mark):

- the 200k-character record (its file: 200,382 bytes): SmolLM2's tokenizer makes 41,546 tokens of
  it, built in 0.2 s, peak +30 MiB, cut to max_seq_length=512; the tests' tiny tokenizer (byte-level
  BPE trained on a few sentences) 99,883 tokens, 0.2-0.3 s, peak +37 MiB, cut to 256.
- the 50k-record file (15.7 MB: 50,000 lines of 314 bytes): the tiny tokenizer (more tokens per
  character: 11.5M tokens) 33-52 s, peak +442 MiB. Built rows go into Arrow every 2,048 examples
  (data/dataset.py); held as Python lists until the end they took +1.9 GiB (SmolLM2's tokenizer:
  19 s, +817 MiB).

Before the held-out fix, the 200k record as an eval record reached `generate` whole: 41k tokens and
a 27 GB attention allocation on the real model.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pytest

from config import Settings, get_settings
from data.dataset import build_sft_dataset_with_report
from models import load_tokenizer
from tests.tiny import one_torch_thread
from tests.tiny_model import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import finetune_llm_lora  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog and then a few more words appear here".split()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_chars // 3))[:n_chars]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def peak_rss_mib(reset: bool = False) -> float:
    """This process's peak resident memory (Linux VmHWM), MiB. `reset=True` first lowers the peak to
    the current size, so a later call measures what came after: without it an earlier test's higher
    peak hides any growth below it (after a 1 GiB peak, 300 MiB more read as +0)."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def test_a_200k_character_record_builds_fast_and_is_cut_to_max_seq_length(tmp_path):
    tiny = make_tiny_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "big.jsonl", [{"instruction": text(200_000), "output": "Short."}]
                       + [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(9)])
    settings = get_settings(["--dataset_path", str(data), "--eval_split_size", "0", "--max_seq_length", "256"], env_file=None)
    tokenizer = load_tokenizer(settings, str(tiny))
    peak_before = peak_rss_mib(reset=True)
    started = time.perf_counter()
    built, report = build_sft_dataset_with_report(settings, tokenizer)
    seconds, peak_growth = time.perf_counter() - started, peak_rss_mib() - peak_before
    assert seconds < 30, f"{seconds:.1f} s"
    assert peak_growth < 256, f"peak grew by {peak_growth:.0f} MiB"
    assert report.splits["train"].truncated == 1 and report.splits["train"].length_max == 256
    assert max(len(ids) for ids in built["train"]["input_ids"]) == 256


def test_held_out_prompts_obey_max_seq_length(tmp_path, monkeypatch):
    """One 200k-character eval record: every prompt handed to generate fits max_seq_length minus the
    48 new tokens, cut from the left as training rows are, so the question's end survives."""
    import inference

    tiny = make_tiny_model_dir(tmp_path)
    huge = text(200_000) + " What is your name?"
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": huge, "output": "Orrin."},
                                                  {"instruction": "Who made you?", "output": "Kestrel Works."}])
    prompts = []
    original = inference.generate_ids

    def recording(model, batch, *args, **kwargs):
        prompts.extend(batch)
        assert max(len(ids) for ids in batch) <= 256 - 48, "a held-out prompt longer than a training row"
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(inference, "generate_ids", recording)
    with one_torch_thread():
        summary = finetune_llm_lora.main([
            "--base_model_name", str(tiny), "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
            "--dataset_path", str(REPO / "data/identity_demo.jsonl"), "--eval_dataset_path", str(evals),
            "--max_seq_length", "256", "--per_device_train_batch_size", "4"])
    assert len(summary["answers_before"]) == len(summary["answers_after"]) == 2
    tokenizer = load_tokenizer(get_settings([], env_file=None), str(tiny))
    assert [len(p) for p in prompts] == [208, len(prompts[1])] * 2 and len(prompts[1]) < 208
    assert tokenizer.decode(prompts[0]).endswith("What is your name?\n\n### Response:")


@pytest.mark.slow
def test_a_50k_record_file_builds_in_bounded_time_and_memory(tmp_path):
    tiny = make_tiny_model_dir(tmp_path)
    records = [{"instruction": text(120, seed=i), "output": text(160, seed=-i)} for i in range(50_000)]
    data = write_jsonl(tmp_path / "many.jsonl", records)
    settings = get_settings(["--dataset_path", str(data), "--eval_split_size", "0.1"], env_file=None)
    tokenizer = load_tokenizer(settings, str(tiny))
    peak_before = peak_rss_mib(reset=True)
    started = time.perf_counter()
    built, report = build_sft_dataset_with_report(settings, tokenizer)
    seconds, peak_growth = time.perf_counter() - started, peak_rss_mib() - peak_before
    assert report.splits["train"].kept == 45_000 and report.splits["eval"].kept == 5_000
    assert seconds < 300, f"{seconds:.0f} s"
    assert peak_growth < 1024, f"peak grew by {peak_growth:.0f} MiB"  # +1.9 GiB with rows kept as Python lists
