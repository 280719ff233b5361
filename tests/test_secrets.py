"""A planted HF_TOKEN appears nowhere: not in stdout, stderr or logs, nor in any file a run writes.

One SFT run (LoRA, checkpoints every 2 steps, TensorBoard on, the token also given as a flag,
interrupted by SIGTERM at step 3 and resumed), one DPO run and one merge, on the tiny model; then
every file under their output folders (settings, training_args.bin, trainer_state.json, optimizer
and RNG states, weights, model cards, TensorBoard events, metrics.jsonl) is read as bytes and
searched for the token.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback

from config import SECRET_FIELDS, Settings
from runs import cli
from tests.tiny import one_torch_thread
from tests.tiny_model import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import dpo  # noqa: E402
import finetune_llm_lora  # noqa: E402
import merge_adapter  # noqa: E402

TOKEN = "hf_PlantedSecret0123456789abcdef"


class SigtermAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def with_tensorboard_and(monkeypatch, module, callbacks=()):
    """The example's trainer with TensorBoard logging on (the examples log to "none") and extra callbacks."""
    import techniques.training

    original_args = techniques.training.trainer_arguments
    monkeypatch.setattr(techniques.training, "trainer_arguments",
                        lambda settings: {**original_args(settings), "report_to": "tensorboard"})
    import techniques.sft

    monkeypatch.setattr(techniques.sft, "trainer_arguments", techniques.training.trainer_arguments)
    name = "build_dpo_trainer" if hasattr(module, "build_dpo_trainer") else "build_sft_trainer"
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: original(*a, **{**k, "callbacks": list(k["callbacks"]) + list(callbacks)}))


def test_a_planted_token_never_leaves_memory(tmp_path, monkeypatch, capfd, caplog):
    with one_torch_thread():
        run_and_search(tmp_path, monkeypatch, capfd, caplog)


def run_and_search(tmp_path, monkeypatch, capfd, caplog):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level("DEBUG")
    tiny = make_tiny_model_dir(tmp_path)
    sft_out, dpo_out, merged = tmp_path / "sft", tmp_path / "dpo", tmp_path / "merged"
    common = ["--base_model_name", str(tiny), "--logging_steps", "1", "--save_steps", "2", "--eval_split_size", "0",
              "--per_device_train_batch_size", "4"]
    sft = [*common, "--output_dir", str(sft_out), "--max_steps", "4", "--dataset_path", str(REPO / "data/identity_demo.jsonl"),
           "--hf_token", TOKEN]

    with monkeypatch.context() as patch:
        with_tensorboard_and(patch, finetune_llm_lora, [SigtermAt(3)])
        with pytest.raises(SystemExit) as stop:
            cli.run(finetune_llm_lora.main, sft)
    assert stop.value.code == 143
    resume = capfd.readouterr().err.strip().splitlines()[-1].split()
    assert resume[-2:] == ["--resume_from_checkpoint", f"{sft_out}/checkpoint-3"] and "--hf_token" not in resume
    with monkeypatch.context() as patch:
        with_tensorboard_and(patch, finetune_llm_lora)
        finetune_llm_lora.main(resume[resume.index("--base_model_name"):])
    dpo.main([*common, "--output_dir", str(dpo_out), "--max_steps", "2", "--dpo_dataset_path", str(REPO / "data/preference_demo.jsonl")])
    merge_adapter.main(["--adapter_dir", str(sft_out / "final"), "--output_dir", str(merged)])

    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text
    files = [p for folder in (sft_out, dpo_out, merged) for p in folder.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"training_args.bin", "trainer_state.json", "optimizer.pt", "run_settings.json", "README.md",
            "adapter_model.safetensors", "model.safetensors", "metrics.jsonl"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names)  # TensorBoard wrote its log
    leaked = [str(p) for p in files if TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    assert len(files) > 40


def test_every_token_and_key_setting_is_a_secret():
    """Fields named *_token / *_key are SecretStr, never saved and never shown as a default."""
    from pydantic import SecretStr

    from config import env_example_text

    secrets = [name for name in Settings.model_fields if name.endswith(("_token", "_key"))]
    assert list(SECRET_FIELDS) == secrets == ["hf_token"]
    for name in secrets:
        assert Settings.model_fields[name].annotation == SecretStr | None
        assert name not in Settings(_env_file=None, **{name: "x"}).to_saved_dict()
    assert f"{secrets[0].upper()}=\n" in env_example_text()
