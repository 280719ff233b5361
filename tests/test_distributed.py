"""Two processes train one model: every example under torchrun (2 CPU processes, gloo) matches one
process at the same global batch, step for step.

tests/ddp_scenarios.py runs LoRA, QLoRA, full fine-tuning (LLRD) and DPO, each with and without
gradient checkpointing, for 4 steps without warmup (so steps 2-4 follow real updates) with an
evaluation before the first step, at step 2 and at the end: once as one process with micro
batch 8, once under `torchrun --nproc_per_node 2` with micro batch 4. The ranks must average
their gradients (the model wrapped in DDP), so per-step losses and final weights agree to float
rounding; eval figures are exact over the eval set on any number of processes; and only the main
process prints. The per-step losses of both launches, side by side, and the largest final weight
difference land in <pytest tmp>/ddp0/losses.md, which the run prints.
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

from tests.ddp_scenarios import SCENARIOS, STEPS
from tests.tiny_model import make_tiny_model_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RUNS = [f"{name}{suffix}" for name in SCENARIOS for suffix in ("", "-gc")]
TOLERANCE = 1e-5


def launch(command: list[str], log: Path, status: int = 0, **env_extra) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_extra}  # torchrun's default, for both runs
    env = {k: v for k, v in env.items() if not k.startswith(("LORA_", "LEARNING_RATE", "MAX_STEPS", "RESUME_", "SAVE_"))}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log.write_text(result.stdout + result.stderr)
    assert (result.returncode == 0) == (status == 0), \
        f"{' '.join(command)} exited {result.returncode}; see {log}:\n{(result.stdout + result.stderr)[-3000:]}"
    return result.stdout + (result.stderr if status else "")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """One 1-process and one 2-process launch of every scenario; returns their parent folder."""
    root = tmp_path_factory.mktemp("ddp")
    model_dir = str(make_tiny_model_dir(root))
    script = str(REPO / "tests" / "ddp_scenarios.py")
    launch([sys.executable, script, model_dir, str(root / "one"), "8"], root / "one.log")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    (root / "two.stdout").write_text(launch(torchrun + [script, model_dir, str(root / "two"), "4"], root / "two.log"))
    # Written before any comparison runs, so the numbers are there to read when one fails.
    (root / "losses.md").write_text(loss_table(root))
    return root


def step_losses(run: Path) -> list[tuple[int, float, float]]:
    """(step, loss, learning rate) of every logged training step."""
    return [(row["step"], row["loss"], row["learning_rate"]) for row in logged(run) if "loss" in row]


def weight_difference(runs: Path, scenario: str) -> float:
    """Largest |1-process - 2-process| over the final trainable weights."""
    one, two = trainable_weights(runs / "one" / scenario, scenario), trainable_weights(runs / "two" / scenario, scenario)
    return max((one[k].float() - two[k].float()).abs().max().item() for k in one)


def loss_table(runs: Path) -> str:
    """Markdown: every scenario's per-step loss as 1 and 2 processes, the LR the step's update
    used, and the largest final weight difference; a scenario that did not finish shows "-"."""
    lines = ["| scenario | step | lr | loss, 1 process | loss, 2 processes | abs diff |", "|---|---|---|---|---|---|"]
    worst = ["", "| scenario | max abs final weight diff |", "|---|---|"]
    for scenario in RUNS:
        try:
            one, two = step_losses(runs / "one" / scenario), {step: loss for step, loss, _ in step_losses(runs / "two" / scenario)}
        except FileNotFoundError:
            lines.append(f"| {scenario} | - | - | - | - | - |")
            continue
        for step, loss, lr in one:
            diff = f"{abs(loss - two[step]):.1e}" if step in two else "-"
            lines.append(f"| {scenario} | {step} | {lr:.2g} | {loss:.8f} | {two.get(step, float('nan')):.8f} | {diff} |")
        try:
            worst.append(f"| {scenario} | {weight_difference(runs, scenario):.1e} |")
        except (FileNotFoundError, KeyError, ValueError) as exc:
            worst.append(f"| {scenario} | - ({type(exc).__name__}) |")
    return "\n".join(lines + worst) + "\n"


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def trainable_weights(run: Path, scenario: str) -> dict[str, torch.Tensor]:
    if scenario.startswith("full"):
        return load_file(run / "final-full" / "model.safetensors")
    return load_file(run / "final" / "adapter_model.safetensors")


@pytest.mark.parametrize("scenario", RUNS)
def test_two_processes_train_the_one_process_model(runs_dir, scenario):
    one, two = runs_dir / "one" / scenario, runs_dir / "two" / scenario
    summary_one, summary_two = (json.loads((run / "returned.json").read_text()) for run in (one, two))
    assert summary_one["processes"] == 1 and summary_two["processes"] == 2
    assert summary_two["model_wrapper"] == "DistributedDataParallel"  # really wrapped, so gradients are averaged

    losses = {name: [(row["step"], row["loss"]) for row in logged(run) if "loss" in row] for name, run in (("1", one), ("2", two))}
    assert [step for step, _ in losses["1"]] == list(range(1, STEPS + 1)) == [step for step, _ in losses["2"]]
    for (step, loss_one), (_, loss_two) in zip(losses["1"], losses["2"], strict=True):
        assert abs(loss_one - loss_two) <= TOLERANCE, f"step {step}: {loss_one} vs {loss_two}"

    weights_one, weights_two = trainable_weights(one, scenario), trainable_weights(two, scenario)
    assert weights_one.keys() == weights_two.keys() and weights_one
    assert weight_difference(runs_dir, scenario) <= TOLERANCE


def test_the_loss_table_covers_every_scenario_and_step(runs_dir, capsys):
    """losses.md, the side-by-side numbers a note on this test can quote, is complete; it is
    printed past pytest's capture so a CI log shows it."""
    table = (runs_dir / "losses.md").read_text()
    for scenario in RUNS:
        assert [line.split(" | ")[1] for line in table.splitlines() if line.startswith(f"| {scenario} | ")][:STEPS] \
            == [str(step) for step in range(1, STEPS + 1)]
    with capsys.disabled():
        print(f"\n1 vs 2 processes, global batch 8 ({runs_dir / 'losses.md'}):\n{table}")


@pytest.mark.parametrize("scenario", RUNS)
def test_eval_figures_are_exact_under_two_processes(runs_dir, scenario):
    """Evaluations before training, at step 2 and at the end (eval batch 3 over 11 examples / 10 pairs:
    a short last batch, which DDP samplers would pad with repeated examples) agree."""
    evals = {}
    for name in ("one", "two"):
        evals[name] = [row for row in logged(runs_dir / name / scenario) if "eval_loss" in row]
    # before training, at step 2 and at the last step: the trainer's, which the example reuses as
    # its "after training" figures (runs.measure.final_eval) since eval_steps 2 divides STEPS
    assert [row["step"] for row in evals["one"]] == [0, 2, STEPS] == [row["step"] for row in evals["two"]]
    keys = ["eval_loss", "eval_weight"] + (["eval_rewards/margins", "eval_rewards/accuracies"] if scenario.startswith("dpo") else [])
    for row_one, row_two in zip(evals["one"], evals["two"], strict=True):
        for key in keys:
            assert row_one[key] == pytest.approx(row_two[key], abs=1e-6), (row_one["step"], key)
    assert evals["one"][0]["eval_weight"] == (10 if scenario.startswith("dpo") else 526)  # pairs / supervised tokens


def test_sigterm_to_one_rank_stops_both_at_one_step_and_the_printed_command_resumes_them(runs_dir):
    """Rank 1 alone gets SIGTERM during step 2 (a signal reaches processes at different moments):
    both ranks stop after step 2 (the flag is reduced over ranks at each step end), checkpoint-2 is
    saved once and complete, the stop is printed once with the resume command; that command, run
    under torchrun, finishes the run with the uninterrupted 2-process run's weights."""
    model_dir = str(runs_dir / "tiny-llama")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = str(REPO / "tests" / "ddp_scenarios.py")
    out = launch(torchrun + [script, model_dir, str(runs_dir / "stopped"), "4", "lora"], runs_dir / "stopped.log",
                 status=143, SIGTERM_RANK_1_AT_STEP="2")
    run = runs_dir / "stopped" / "lora"
    assert out.count("stopped: SIGTERM at step 2") == 1  # printed by the main process only
    assert f"saved a resumable checkpoint to {run}/checkpoint-2" in out
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", "final"))) == ["checkpoint-2"]
    command = out[out.index("Resume with"):].splitlines()[1].split()
    assert command[:3] == ["torchrun", "--nproc_per_node", "2"] and command[3] == "examples/finetune_llm_lora.py"
    launch(torchrun + command[3:], runs_dir / "resumed.log")
    resumed, uninterrupted = trainable_weights(run, "lora"), trainable_weights(runs_dir / "two" / "lora", "lora")
    assert resumed.keys() == uninterrupted.keys()
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) <= TOLERANCE
    losses = [(row["step"], row["loss"]) for row in logged(run) if "loss" in row]
    expected = [(row["step"], row["loss"]) for row in logged(runs_dir / "two" / "lora") if "loss" in row]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)) and all(abs(a[1] - b[1]) <= TOLERANCE for a, b in zip(losses, expected, strict=True))


def test_only_the_main_process_prints_and_held_out_answers_are_generated(runs_dir):
    out = (runs_dir / "two.stdout").read_text()
    sft_runs = sum(1 for run in RUNS if not run.startswith("dpo"))
    assert out.count("SFT data: template=alpaca") == sft_runs  # once per run, not once per rank
    assert out.count("=== before training ===") == len(RUNS) == out.count("=== after training ===")
    assert out.count("effective batch 8 = 4 micro x 1 accumulation x 2 processes") == sft_runs
    assert out.count("effective batch 8 pairs = 4 micro x 1 accumulation x 2 processes") == len(RUNS) - sft_runs
    for scenario in RUNS:
        if scenario.startswith("dpo"):
            continue
        summary = json.loads((runs_dir / "two" / scenario / "returned.json").read_text())
        assert len(summary["answers_before"]) == len(summary["answers_after"]) == 4
    assert not list((runs_dir / "two" / "lora").glob(".prepared*"))  # the shared data folder is cleaned up


def test_only_the_main_process_writes_the_run_outputs(runs_dir):
    """Two processes leave what one leaves, written once: TensorBoard events from one process id,
    one summary block and one line per logging step in the output."""
    out = (runs_dir / "two.stdout").read_text()
    assert out.count("=== run summary ===") == len(RUNS)
    assert out.count(f"step 1/{STEPS} | loss ") == len(RUNS)
    for scenario in RUNS:
        one, two = runs_dir / "one" / scenario, runs_dir / "two" / scenario
        assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
        events = list((two / "runs").rglob("events.out.tfevents.*"))
        assert events and len({name.name.split(".")[-2] for name in events}) == 1  # <time>.<host>.<pid>.<n>: one pid
        summary = json.loads((two / "summary.json").read_text())
        assert summary["processes"] == 2 and summary["steps"] == STEPS
        assert (two / "final" if not scenario.startswith("full") else two / "final-full").joinpath("README.md").is_file()
