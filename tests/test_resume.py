"""A run stopped by SIGTERM and resumed in a fresh process trains exactly the uninterrupted run.

tests/resume_scenarios.py runs, for LoRA (with SAVE_TOTAL_LIMIT=2), QLoRA, full fine-tuning (LLRD
optimizer groups, weight decay) and DPO (continuing an SFT adapter, so its reference is TRL's
frozen copy of it): run A for 12 optimizer steps, and run B, which receives a real SIGTERM during
step 8, saves checkpoint-8, stops and prints its resume command. A second process (fresh: nothing
in memory) runs that command. The SFT runs take 4 micro batches x 2 accumulation from 40 records,
5 steps per epoch: the resume point lies inside the second epoch. Batches are length-grouped (the
default), and LoRA dropout is on (0.05), so the restored RNG state matters too. Compared: the example ids of every micro batch of steps
9-12, every optimizer group's LR at steps 9-12, the optimizer and scheduler state the resumed run
starts from against A's at step 8, the final trainable weights (atol 1e-6; they come out bit-equal),
and for DPO the reference adapter and the logged rewards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.resume_scenarios import SCENARIOS, STEPS, STOP_AT
from tests.tiny_model import make_tiny_model_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def launch(args: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith(("LORA_", "LEARNING_RATE", "MAX_STEPS", "RESUME_", "SAVE_"))}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "resume_scenarios.py"), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"see {log}:\n{(result.stdout + result.stderr)[-3000:]}"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    model_dir = str(make_tiny_model_dir(root))
    launch([model_dir, str(root / "out"), "first"], root / "first.log")
    launch([model_dir, str(root / "out"), "resume"], root / "resume.log")
    return root / "out"


def record(run: Path) -> dict:
    data = json.loads((run / "record.json").read_text())
    return {**data, "batches": {int(k): v for k, v in data["batches"].items()}, "lrs": {int(k): v for k, v in data["lrs"].items()}}


def trainable(run: Path, scenario: str) -> dict[str, torch.Tensor]:
    return load_file(run / ("final-full/model.safetensors" if scenario == "full" else "final/adapter_model.safetensors"))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_interrupted_run_saves_a_checkpoint_and_prints_its_resume_command(out, scenario):
    stop = json.loads((out / scenario / "B" / "interrupted.txt").read_text())
    checkpoint = out / scenario / "B" / f"checkpoint-{STOP_AT}"
    assert stop["exit_code"] == 143  # 128 + SIGTERM
    assert stop["message"].startswith(f"SIGTERM at step {STOP_AT}: saved a resumable checkpoint to {checkpoint}")
    command = stop["message"].splitlines()[-1]
    assert command.strip().startswith(f"python examples/{SCENARIOS[scenario][0]}.py ")
    assert command.endswith(f"--resume_from_checkpoint {checkpoint}")
    assert not any(name.startswith("final") for name in stop["folders"])  # a stopped run writes no final folder
    expected = ["checkpoint-4", "checkpoint-8"]
    assert [f for f in stop["folders"] if f.startswith("checkpoint")] == expected


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_resumed_run_sees_the_same_batches_and_learning_rates(out, scenario):
    a, b = record(out / scenario / "A"), record(out / scenario / "B")
    assert b["resumed_from"] == STOP_AT and sorted(b["batches"]) == list(range(STOP_AT + 1, STEPS + 1))
    for step in range(STOP_AT + 1, STEPS + 1):
        assert b["batches"][step] == a["batches"][step], step  # example ids of every micro batch, in order
        assert b["lrs"][step] == a["lrs"][step], step  # every optimizer group's LR
    # LLRD: the head (with the tied embeddings), then 2 layers x (decay, no decay); LoRA: TRL's 2 groups
    assert len(a["lrs"][STEPS]) == (5 if scenario == "full" else 2)
    if scenario != "dpo":  # the SFT scenarios cross into their third epoch: 5 steps of 8 examples each
        assert sorted(sum((a["batches"][s] for s in range(6, 11)), [])) == list(range(40))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_resumed_run_starts_from_the_optimizer_and_scheduler_state_of_step_8(out, scenario):
    resumed = torch.load(out / scenario / "B" / "resumed_state.pt", weights_only=False)
    optimizer = torch.load(out / scenario / "A" / f"checkpoint-{STOP_AT}" / "optimizer.pt", weights_only=False)
    scheduler = torch.load(out / scenario / "A" / f"checkpoint-{STOP_AT}" / "scheduler.pt", weights_only=False)
    assert resumed["scheduler"] == scheduler
    assert [g["lr"] for g in resumed["optimizer"]["param_groups"]] == [g["lr"] for g in optimizer["param_groups"]]
    assert resumed["optimizer"]["state"].keys() == optimizer["state"].keys() and optimizer["state"]
    for index, state in optimizer["state"].items():
        for key, value in state.items():  # step, exp_avg, exp_avg_sq
            assert torch.equal(resumed["optimizer"]["state"][index][key], value), (index, key)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_resumed_run_ends_with_the_uninterrupted_runs_weights(out, scenario):
    a, b = trainable(out / scenario / "A", scenario), trainable(out / scenario / "B", scenario)
    assert a.keys() == b.keys() and a
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6


def test_resume_keeps_its_checkpoint_until_a_newer_one_exists(out):
    """LoRA runs with SAVE_TOTAL_LIMIT=2: the checkpoint resumed from is there when training restarts,
    and only the older one goes when step 12's is written."""
    b = record(out / "lora" / "B")
    assert b["checkpoints_at_start"] == ["checkpoint-4", "checkpoint-8"]
    assert sorted(p.name for p in (out / "lora" / "B").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]
    assert sorted(p.name for p in (out / "qlora" / "B").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]


def test_dpo_resume_keeps_its_reference(out):
    """The reference of a DPO run continuing an SFT adapter is a frozen copy of that adapter: after
    resuming it is still the SFT adapter (not the trained policy), and the rewards logged at steps
    9-12, which are measured against it, equal the uninterrupted run's."""
    ref = torch.load(out / "dpo" / "B" / "resumed_state.pt", weights_only=False)["ref"]
    sft = load_file(out / "lora" / "A" / "final" / "adapter_model.safetensors")
    assert ref.keys() == sft.keys()
    assert all(torch.equal(ref[k], sft[k]) for k in sft)
    policy = trainable(out / "dpo" / "B", "dpo")
    assert any(not torch.equal(policy[k], sft[k]) for k in sft)  # the policy did move away from it

    def rewards(run: str) -> dict[int, tuple]:
        rows = [json.loads(line) for line in (out / "dpo" / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["rewards/margins"], r["rewards/chosen"]) for r in rows if "rewards/margins" in r}

    a, b = rewards("A"), rewards("B")
    assert sorted(b) == list(range(1, STEPS + 1))  # the resumed log keeps steps 1-8 and appends 9-12
    for step in range(STOP_AT + 1, STEPS + 1):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
