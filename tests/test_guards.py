"""Run guards: whole checkpoints, resume points, output dirs, Ctrl-C / SIGTERM, divergence.

The checkpoint and output-dir rules are checked on folders; the interruption, divergence and
final-save paths run the LoRA example on the tiny model through the scripts' entry point (`runs.cli.run`).
The slow tests/test_resume.py resumes interrupted runs in a fresh process and compares them with
uninterrupted ones.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from config import Settings, get_settings
from runs import cli, guards, outputs
from techniques.checkpoints import complete_checkpoints, is_complete_checkpoint, rotate_checkpoints
from tests.tiny import one_torch_thread
from tests.tiny_model import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import finetune_llm_lora  # noqa: E402


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("guards"))


def checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def settings_for(out: Path, *flags: str) -> Settings:
    return get_settings(["--output_dir", str(out), *flags], env_file=None)


# ---------------------------------------------------------------- checkpoints and resume points


def test_only_checkpoints_with_their_trainer_state_are_complete(tmp_path):
    good, missing = checkpoint(tmp_path, 4), checkpoint(tmp_path, 8, complete=False)
    truncated = checkpoint(tmp_path, 12, complete=False)
    (truncated / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    wrong = checkpoint(tmp_path, 16, complete=False)
    (wrong / "trainer_state.json").write_text(json.dumps({"global_step": 3}))  # copied from elsewhere
    assert [is_complete_checkpoint(p) for p in (good, missing, truncated, wrong)] == [True, False, False, False]
    assert complete_checkpoints(tmp_path) == [good]


def test_auto_resumes_from_the_latest_complete_checkpoint_and_skips_incomplete_ones(tmp_path, capsys):
    checkpoint(tmp_path, 4)
    checkpoint(tmp_path, 10)
    checkpoint(tmp_path, 12, complete=False)  # a save cut short (written in place by another tool)
    (tmp_path / ".partial-checkpoints" / "checkpoint-14").mkdir(parents=True)  # ours, cut short
    assert guards.resolve_resume(settings_for(tmp_path, "--resume_from_checkpoint", "auto")) == str(tmp_path / "checkpoint-10")
    assert "skipping incomplete checkpoint-12" in capsys.readouterr().out


def test_auto_without_a_checkpoint_starts_fresh_but_never_over_a_finished_run(tmp_path):
    assert guards.resolve_resume(settings_for(tmp_path / "new", "--resume_from_checkpoint", "auto")) is None
    (tmp_path / "done" / "final").mkdir(parents=True)
    with pytest.raises(guards.RunSetupError, match=r"holds a finished run \(final/\) and no checkpoint"):
        guards.resolve_resume(settings_for(tmp_path / "done", "--resume_from_checkpoint", "auto"))


def test_rotation_keeps_the_newest_complete_checkpoint_whatever_else_lies_there(tmp_path):
    """transformers' rotation protects the "most recent" folder by mtime, or by step when mtimes lie
    within a second: a half-written checkpoint-12 would be kept and checkpoint-8 deleted."""
    for step in (2, 4, 8):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 12, complete=False)
    deleted = rotate_checkpoints(tmp_path, save_total_limit=1, keep=tmp_path / "checkpoint-8")
    assert deleted == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-8"]
    assert rotate_checkpoints(tmp_path, None, keep=tmp_path / "checkpoint-8") == []


def test_a_save_cut_short_leaves_no_checkpoint_folder(tiny, tmp_path, monkeypatch):
    """The trainer writes into .partial-checkpoints/ and renames: a failure while the RNG states are
    written (the optimizer and weights are already on disk) leaves no checkpoint-N; the next save
    clears the leftovers."""
    from datasets import Dataset, DatasetDict

    from models import load_model, load_tokenizer
    from techniques.lora import apply_lora
    from techniques.sft import Trainer, build_sft_trainer

    settings = settings_for(tmp_path, "--base_model_name", str(tiny), "--max_steps", "2", "--save_steps", "1",
                            "--per_device_train_batch_size", "2")
    tokenizer = load_tokenizer(settings, str(tiny))
    rows = {"input_ids": [[1, 5, 6, 7, 2]] * 4, "attention_mask": [[1] * 5] * 4, "labels": [[-100, 5, 6, 7, 2]] * 4}
    trainer = build_sft_trainer(apply_lora(load_model(settings, str(tiny)), settings), tokenizer,
                                DatasetDict(train=Dataset.from_dict(rows)), settings)
    original = Trainer._save_rng_state

    def killed(self, output_dir):
        if self.state.global_step == 2:
            raise KeyboardInterrupt  # stands in for the process dying here
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", killed)
    with pytest.raises(KeyboardInterrupt), one_torch_thread():
        trainer.train()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not (tmp_path / "checkpoint-2").exists()
    assert (tmp_path / ".partial-checkpoints" / "checkpoint-2" / "optimizer.pt").is_file()  # what was cut short
    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    trainer.train(resume_from_checkpoint=guards.resolve_resume(settings_for(tmp_path, "--resume_from_checkpoint", "auto")))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / ".partial-checkpoints").exists()


# ---------------------------------------------------------------- the output dir


def test_an_output_dir_holding_a_run_is_refused_unless_asked(tmp_path):
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    checkpoint(out, 5)
    (out / "metrics.jsonl").write_text('{"step": 5}\n')
    with pytest.raises(guards.RunSetupError, match=r"already holds a finished run \(final/\)\. Continue it with "
                                                  r"RESUME_FROM_CHECKPOINT=auto, start over with OVERWRITE_OUTPUT_DIR=true"):
        guards.check_output_dir(settings_for(out))
    guards.check_output_dir(settings_for(out, "--resume_from_checkpoint", "auto"))  # allowed, nothing deleted
    assert (out / "checkpoint-5").is_dir()
    guards.check_output_dir(settings_for(out, "--overwrite_output_dir", "true"))
    assert sorted(p.name for p in out.iterdir()) == ["final"]  # the old checkpoints and log are gone; final waits


def test_an_output_dir_that_is_a_file_or_unwritable_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(guards.RunSetupError, match="is a file, not a folder"):
        guards.check_output_dir(settings_for(tmp_path / "file"))
    with pytest.raises(guards.RunSetupError, match="is not writable"):
        guards.check_output_dir(settings_for(tmp_path / "file" / "below"))
    if os.geteuid() != 0:  # root writes through permission bits (tests/test_bad_input.py uses /sys)
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(guards.RunSetupError, match="is not writable"):
            guards.check_output_dir(settings_for(tmp_path / "locked"))


def test_the_resume_command_keeps_the_flags_and_leaves_out_secrets(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["--lora_r", "8", "--hf_token", "hf_SECRET", "--resume-from-checkpoint", "old", "--hf-token=hf_SECRET2", "--max_steps", "9"]
    command = guards.resume_command(REPO / "examples" / "dpo.py", argv)("out/checkpoint-4")
    assert command == "python examples/dpo.py --lora_r 8 --max_steps 9 --resume_from_checkpoint out/checkpoint-4"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert guards.resume_command("examples/dpo.py", [])("c").startswith("torchrun --nproc_per_node 2 examples/dpo.py")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert guards.resume_command("examples/dpo.py", [])("c").startswith("accelerate launch --config_file '<the same config>'")


# ---------------------------------------------------------------- a signal, a diverged step


def run_example(tiny, out: Path, *flags: str, callbacks=(), monkeypatch=None) -> int:
    """The LoRA example through the scripts' entry point, with extra trainer callbacks; returns its exit status."""
    original = finetune_llm_lora.build_sft_trainer

    def build(*args, callbacks_=list(callbacks), **kwargs):
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + callbacks_
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune_llm_lora, "build_sft_trainer", build)
    argv = ["--base_model_name", str(tiny), "--output_dir", str(out), "--dataset_path", str(REPO / "data/identity_demo.jsonl"),
            "--eval_split_size", "0", "--per_device_train_batch_size", "4", "--logging_steps", "1", *flags]
    with pytest.raises(SystemExit) as stop, one_torch_thread():
        cli.run(finetune_llm_lora.main, argv)
    return stop.value.code


class SignalAt(TrainerCallback):
    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


def test_ctrl_c_saves_a_checkpoint_at_the_step_end_and_prints_the_resume_command(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code = run_example(tiny, out, "--max_steps", "6", callbacks=[SignalAt(2, signal.SIGINT)], monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 130  # 128 + SIGINT
    assert f"stopped: SIGINT at step 2: saved a resumable checkpoint to {out}/checkpoint-2" in err
    assert err.rstrip().endswith(f"--max_steps 6 --resume_from_checkpoint {out}/checkpoint-2")
    assert "Traceback" not in err
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"] and not (out / "final").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is itself again after training


def test_a_signal_during_the_last_step_still_saves_the_final_folder(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = finetune_llm_lora.build_sft_trainer
    monkeypatch.setattr(finetune_llm_lora, "build_sft_trainer",
                        lambda *a, **k: original(*a, **{**k, "callbacks": list(k["callbacks"]) + [SignalAt(3, signal.SIGTERM)]}))
    with one_torch_thread():
        summary = finetune_llm_lora.main(["--base_model_name", str(tiny), "--output_dir", str(out), "--max_steps", "3",
                                          "--dataset_path", str(REPO / "data/identity_demo.jsonl"), "--eval_split_size", "0",
                                          "--per_device_train_batch_size", "4"])
    assert Path(summary["final_dir"]) == out / "final" and (out / "final" / "adapter_model.safetensors").is_file()
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-3"]


def test_a_diverged_run_stops_at_the_first_bad_step_and_saves_nothing_as_final(tiny, tmp_path, monkeypatch, capsys):
    """LEARNING_RATE=1e6: step 1 is fine, the weights explode, step 2's gradient norm is nan. Without
    the guard the run went on and saved NaN weights as final/ with exit status 0."""
    out = tmp_path / "out"
    code = run_example(tiny, out, "--max_steps", "6", "--learning_rate", "1e6", "--warmup_steps", "0",
                       "--save_steps", "1", monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 1
    assert "stopped: training diverged at step 2: gradient norm nan" in err
    assert f"last good checkpoint: {out}/checkpoint-1 (resume from it with a lower learning rate:" in err
    assert not (out / "final").exists() and [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    weights = load_file(out / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in logged if "loss" in row}
    assert sorted(losses) == [1, 2] and math.isfinite(losses[1]) and losses[2] != 0.0


def test_a_non_finite_loss_alone_stops_the_run_and_names_the_checkpoint_before_it(tiny, tmp_path, monkeypatch, capsys):
    """Under fp16 or DeepSpeed the gradient-norm check is off and the logged loss is the only check.
    LEARNING_RATE=1e6: step 2's gradient is nan but its loss (computed before the update) is
    finite, so the nan update is applied and saved as checkpoint-2; step 3 logs loss nan. The run
    stops there with exit status 1 and no final/, and names checkpoint-1 as the last good one: it
    named checkpoint-2 (nan weights) and said the step was not applied."""
    monkeypatch.setattr(guards.StopOnDivergence, "on_pre_optimizer_step", TrainerCallback.on_pre_optimizer_step)  # the check off
    out = tmp_path / "out"
    code = run_example(tiny, out, "--max_steps", "6", "--learning_rate", "1e6", "--warmup_steps", "0",
                       "--save_steps", "1", monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "stopped: training diverged at step 3: loss nan (not finite). Nothing was saved as final." in err
    assert f"last good checkpoint: {out}/checkpoint-1 (resume from it with a lower learning rate:" in err
    assert err.rstrip().endswith("saved after the last finite loss, so not good: checkpoint-2")
    assert not (out / "final").exists() and [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    weights = {name: load_file(out / name / "adapter_model.safetensors") for name in ("checkpoint-1", "checkpoint-2")}
    assert all(torch.isfinite(w).all() for w in weights["checkpoint-1"].values())
    assert not all(torch.isfinite(w).all() for w in weights["checkpoint-2"].values())


# ---------------------------------------------------------------- the final save cut short


class Killed(BaseException):
    """Stands in for the process dying (kill -9, a lost node) where it is raised: nothing catches it."""


def die(*args, **kwargs):
    raise Killed


def train_lora(tiny, out: Path, *flags: str) -> dict:
    """One optimizer step of the LoRA example, called as a library (exceptions reach the test)."""
    with one_torch_thread():
        return finetune_llm_lora.main(["--base_model_name", str(tiny), "--output_dir", str(out), "--max_steps", "1",
                                       "--dataset_path", str(REPO / "data/identity_demo.jsonl"), "--eval_split_size", "0",
                                       "--per_device_train_batch_size", "4", *flags])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dies", ["after-the-weights", "between-the-renames"])
def test_a_final_save_cut_short_never_leaves_a_final_folder_mixing_two_runs(dies, tiny, tmp_path, monkeypatch):
    """A second run (OVERWRITE_OUTPUT_DIR=true) dies while saving: with its weights written into
    .final.partial/ but not its generation config and settings, or between replace_dir's renames
    (old final/ moved to .final.old/, the new folder not yet in place). final/ is then the first
    run's, byte for byte, or absent with the first run's kept in .final.old/; never a mix (the issue:
    a kill left final/ with two runs' files, and chat used the wrong template). The next run's save
    clears both leftovers."""
    out = tmp_path / "out"
    train_lora(tiny, out, "--seed", "1")
    first = snapshot(out / "final")
    original_replace = os.replace

    def replace_unless_into_final(src, dst):
        if Path(dst) == out / "final":
            raise Killed
        return original_replace(src, dst)

    with monkeypatch.context() as patch:
        if dies == "after-the-weights":
            patch.setattr(outputs, "save_generation_config", die)
        else:
            patch.setattr(os, "replace", replace_unless_into_final)
        with pytest.raises(Killed):
            train_lora(tiny, out, "--seed", "2", "--overwrite_output_dir", "true")
    partial = out / ".final.partial"
    if dies == "after-the-weights":
        assert snapshot(out / "final") == first and not (partial / "run_settings.json").exists()
    else:
        assert not (out / "final").exists() and snapshot(out / ".final.old") == first
        assert json.loads((partial / "run_settings.json").read_text())["seed"] == 2  # whole, not yet renamed
    assert (partial / "adapter_model.safetensors").is_file()  # the second run's weights were on disk

    (partial / "from-run-2.txt").write_text("")  # a file only the dead run's kind writes
    train_lora(tiny, out, "--seed", "3", "--overwrite_output_dir", "true")
    assert json.loads((out / "final" / "run_settings.json").read_text())["seed"] == 3
    assert sorted(snapshot(out / "final")) == sorted(first)  # nothing of the dead run in it
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
