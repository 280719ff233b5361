"""What a run leaves behind and prints: files in <output_dir>, TensorBoard events, model card, logs.

`check_run_outputs` is called by the tiny end-to-end runs of every example (tests/test_example.py,
test_full_finetune.py, test_dpo.py), so each technique's files are checked without training twice.
"""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from config import DEFAULT_MODEL_ID, Settings, check_trackers, get_settings
from runs import card, outputs, plots
from techniques.training import format_log_line, group_learning_rates

FILES = ("metrics.jsonl", "loss.png", "settings.json", "summary.json", "runs")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def check_run_outputs(output_dir: Path, final_dir: Path, stdout: str, *, max_steps: int, logged_keys=("loss",),
                      technique: str, library: str, template: str = "alpaca", eval_steps: int = 0) -> dict:
    """Assert every output of a finished run exists and parses; returns the metrics.jsonl rows.

    One metrics.jsonl row per logging step (the runs log every step) with `logged_keys`; one eval
    row before training, every `eval_steps` and after training, printed once each (when the trainer
    evaluated at the last step, the script reuses that evaluation instead of running it again); a
    loss.png of the size its panels need; JSON files that load; TensorBoard events holding the
    same train losses and the eval losses; a model card that parses without metadata errors and
    names base model, technique and template; one printed line per logging step and the summary block.
    """
    for name in FILES:
        assert (output_dir / name).exists(), name
    rows = plots.read_metrics(output_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, max_steps + 1))
    assert all(key in r for r in train for key in logged_keys), logged_keys
    eval_steps_expected = [0, *(range(eval_steps, max_steps, eval_steps) if eval_steps else ()), max_steps]  # before, during, after
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == eval_steps_expected

    with Image.open(output_dir / "loss.png") as png:
        png.load()
        assert png.format == "PNG" and png.size == plots.figure_size_px(len(plots.extra_keys(rows)))

    saved = json.loads((output_dir / "settings.json").read_text())
    assert "hf_token" not in saved and saved["output_dir"] == str(output_dir)
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["steps"] == max_steps and summary["final_dir"] == str(final_dir)
    assert summary["results"]["eval_loss"]["after"] == evals[-1]["eval_loss"]
    assert summary["results"]["eval_loss"]["before"] == rows[0]["eval_loss"]
    end = next(r for r in rows if "train_runtime" in r)
    assert summary["tokens_seen"] == end.get("num_tokens", train[-1]["num_tokens"]) >= train[-1]["num_tokens"] > 0
    assert summary["peak_memory"]["cpu_max_rss_bytes"] > 50 * 2**20
    assert summary["train_seconds"] > 0 and summary["wall_seconds"] >= summary["train_seconds"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run_dir] = (output_dir / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tb_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert tb_loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    assert [e.step for e in events.Scalars("eval/loss")] == eval_steps_expected
    assert {f"train/{key}" for key in logged_keys} <= set(events.Tags()["scalars"])

    model_card = ModelCard.load(final_dir / "README.md", ignore_metadata_errors=False)  # raises on bad metadata
    assert model_card.data.library_name == library and model_card.data.pipeline_tag == "text-generation"
    assert technique in model_card.text and f"**{template}**" in model_card.text
    assert json.loads((final_dir / "run_settings.json").read_text())["base_model_name"] in model_card.text
    assert "## Results" in model_card.text and "## How to load" in model_card.text and "## Limitations" in model_card.text

    step_lines = [line for line in stdout.splitlines() if line.startswith("step ") and " | loss " in line]
    assert [line.split(" | ")[0] for line in step_lines] == [f"step {i}/{max_steps}" for i in range(1, max_steps + 1)]
    eval_lines = [line.split(" | ")[0] for line in stdout.splitlines() if line.startswith("step ") and " | eval_loss " in line]
    assert eval_lines == [f"step {i}/{max_steps}" for i in eval_steps_expected]
    assert "\r" not in stdout and "=== run summary ===" in stdout and "chat:" in stdout and "export:" in stdout
    return rows


# ---------------------------------------------------------------- logs


def test_group_learning_rates_follow_the_schedule_per_named_group():
    # LLRD groups after the scheduler stepped: every group at 0.5 of its initial LR; the trainer logged
    # group 0's LR of the step just taken, 0.8e-3 (initial 1e-3).
    groups = [{"name": "head decay", "initial_lr": 1e-3, "lr": 5e-4},
              {"name": "head no_decay", "initial_lr": 1e-3, "lr": 5e-4},
              {"name": "model.layers.1 decay", "initial_lr": 8e-4, "lr": 4e-4},
              {"name": "model.layers.0 decay", "initial_lr": 6.4e-4, "lr": 3.2e-4},
              {"name": "embeddings no_decay", "initial_lr": 5.12e-4, "lr": 2.56e-4}]
    rates = group_learning_rates(groups, 0.8e-3)
    assert rates == pytest.approx({"learning_rate/head": 8e-4, "learning_rate/model.layers.1": 6.4e-4,
                                   "learning_rate/model.layers.0": 5.12e-4, "learning_rate/embeddings": 4.096e-4})
    assert group_learning_rates([{"params": [], "lr": 1e-3}], 1e-3) == {}  # the trainer's own unnamed groups


def test_a_log_event_is_one_line():
    line = format_log_line({"loss": 5.95912, "grad_norm": 0.2381, "learning_rate": 9.5492e-05, "learning_rate/head": 1e-3,
                            "tokens_per_s": 14253.71, "supervised_tokens_per_s": 4176.8, "mfu": 0.071843,
                            "num_tokens": 10316.0, "eval_weight": 12526, "epoch": 1.0, "peak_mem_gib": None},
                           step=1, max_steps=4)
    assert line == ("step 1/4 | loss 5.959 | grad_norm 0.2381 | learning_rate 9.549e-05 | tokens_per_s 14,254"
                    " | supervised_tokens_per_s 4177 | mfu 0.07184 | num_tokens 10,316 | eval_weight 12,526 | epoch 1"
                    " | peak_mem_gib None")


def test_trainer_arguments_use_current_names_without_future_warnings(tmp_path):
    from techniques.sft import sft_config

    settings = get_settings(["--output_dir", str(tmp_path), "--gradient_checkpointing", "true",
                             "--report_to", "none"], env_file=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = sft_config(settings)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert config.activation_checkpointing is True and config.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert config.report_to == []  # transformers' spelling of "none"
    assert sft_config(get_settings(["--output_dir", str(tmp_path)], env_file=None)).report_to == ["tensorboard"]


def test_peft_deprecation_warning_is_filtered_by_setup_logging(tmp_path):
    from runs.processes import setup_logging
    from techniques.lora import apply_lora
    from tests.tiny import make_model, make_tokenizer

    settings = get_settings(["--output_dir", str(tmp_path)], env_file=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup_logging()
        apply_lora(make_model(make_tokenizer("chatml")), settings)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_help_is_not_preceded_by_the_bitsandbytes_kernel_warning():
    """bitsandbytes 0.50 logs "Failed to load CPU gemm_4bit_forward from kernels-community" when peft
    imports it on an AVX512-BF16 CPU (harmless: it falls back to its own kernels); runs/__init__.py
    quietens that logger before any example imports a library. (A CPU without AVX512-BF16 never
    logs it: there this test cannot fail.)"""
    script = Path(__file__).resolve().parents[1] / "examples" / "finetune_llm_lora.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("usage:")
    assert "gemm_4bit_forward" not in result.stderr and "kernels" not in result.stderr, result.stderr


# ---------------------------------------------------------------- trackers


def test_report_to_names_are_checked():
    assert get_settings(["--report_to", "none"], env_file=None).report_to == ["none"]
    # Settings alone parses the names (a saved run's settings reload without the trackers installed)
    assert Settings(_env_file=None, report_to="tensorboard, mlflow").report_to == ["tensorboard", "mlflow"]
    for bad in ("tensorbord", "none,wandb", " , "):
        with pytest.raises(ValueError, match="report_to"):
            get_settings(["--report_to", bad], env_file=None)


def test_a_missing_tracker_package_is_named_with_its_install_command(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "trackio") else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"wandb needs the wandb package: pip install wandb; trackio needs the trackio "
                                         r"package: pip install trackio"):
        get_settings(["--report_to", "tensorboard,wandb,trackio"], env_file=None)
    check_trackers(get_settings(["--report_to", "none"], env_file=None))  # nothing to install


# ---------------------------------------------------------------- loss.png


def test_loss_plot_has_a_panel_per_logged_number(tmp_path, monkeypatch):
    layers = (10, 2, 0)  # as techniques.full_finetune orders its groups: head, top layer down, embeddings
    rows = [{"step": 0, "eval_loss": 4.4, "eval_num_tokens": 0.0}] + [
        {"step": s, "loss": 5 - s / 4, "grad_norm": 1 / s, "learning_rate": 1e-3 * s / 4, "learning_rate/head": 1e-3 * s / 4,
         **{f"learning_rate/model.layers.{i}": 1e-4 * (i + 1) * s / 4 for i in layers}, "learning_rate/embeddings": 5e-5 * s / 4,
         "num_tokens": 100.0 * s, "tokens_per_s": 1000.0, "tokens_per_second": 100.0 * s} for s in range(1, 5)
    ] + [{"step": 4, "eval_loss": 0.3, "eval_num_tokens": 400.0}, {"step": 4, "train_runtime": 12.0, "train_loss": 4.4}]
    assert plots.extra_keys(rows) == ["grad_norm", "num_tokens", "tokens_per_s", "tokens_per_second"]  # a new number needs no code
    figures, close = [], plots.plt.close
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figure to look at what was drawn
    size = plots.plot_metrics(rows, tmp_path / "loss.png", "test")
    with Image.open(tmp_path / "loss.png") as png:
        assert png.size == size == (1500, 1060)
    axes = {ax.get_title(): ax for ax in figures[0].axes}
    assert list(axes) == ["loss", "learning rate, 5 LLRD groups", "gradient norm", "tokens seen", "throughput, all tokens",
                          "tokens per second"]
    lr = axes["learning rate, 5 LLRD groups"]
    assert lr.get_ylabel() == "learning rate"
    # bottom to top, layers by number (a string sort puts layers.10 before layers.2)
    assert [line.get_ydata()[-1] for line in lr.get_lines()] == pytest.approx([5e-5, 1e-4, 3e-4, 1.1e-3, 1e-3])
    luminance = [0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b, _ in (line.get_color() for line in lr.get_lines())]
    assert max(luminance) < 0.75  # no near-white or yellow end on white paper (viridis' last colour: 0.87)
    assert [t.get_text() for t in lr.get_legend().get_texts()] == ["embeddings", "model.layers.0", "model.layers.2",
                                                                  "model.layers.10", "head"]
    assert axes["throughput, all tokens"].get_ylabel() == "tokens/s, all processes"
    assert len(axes["tokens seen"].get_lines()) == 1  # TRL's eval_num_tokens is the train count: no eval line
    close(figures[0])
    assert plots.loss_label(rows) == "cross-entropy (nats per supervised token)"
    assert plots.loss_label([{"step": 1, "loss": 0.69, "rewards/margins": 0.0}]) == "DPO loss (nats per pair)"
    with pytest.raises(ValueError, match="no loss"):
        plots.plot_metrics([{"step": 1, "grad_norm": 1.0}], tmp_path / "x.png")


# ---------------------------------------------------------------- model card


def test_model_card_front_matter_for_hub_names(tmp_path):
    settings = get_settings(["--load_in_4bit", "true", "--dataset_path", "yahma/alpaca-cleaned",
                             "--prompt_template", "chatml"], env_file=None)
    model_card = card.model_card(settings, "sft", {"eval_loss": (4.4421, 0.196)}, sections=("model", "lora", "qlora"))
    reloaded = ModelCard(str(model_card), ignore_metadata_errors=False)
    data = reloaded.data.to_dict()
    assert data["base_model"] == DEFAULT_MODEL_ID and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert data["datasets"] == ["yahma/alpaca-cleaned"] and data["license"] == "apache-2.0"
    assert {"qlora", "lora", "peft", "sft", "ft-kit"} <= set(data["tags"])
    assert "| eval loss | 4.4421 | 0.1960 |" in reloaded.text
    assert "QLoRA (4-bit nf4 base)" in reloaded.text and "**chatml**" in reloaded.text
    assert "| lora_r | `16` |" in reloaded.text and "hf_token" not in reloaded.text

    local = get_settings(["--base_model_name", str(tmp_path), "--llrd_decay", "0.9"], env_file=None)
    full = card.model_card(local, "full", {})
    assert full.data.base_model is None and full.data.datasets is None  # local paths mean nothing on the Hub
    assert full.data.library_name == "transformers" and "full fine-tuning (LLRD 0.9)" in full.text


def test_merged_card_says_it_is_merged(tmp_path):
    import torch

    from techniques.lora import merged_card

    settings = get_settings([], env_file=None)
    card.model_card(settings, "sft", {"eval_loss": (4.4, 0.2)}).save(tmp_path / "README.md")
    merged = merged_card(tmp_path / "README.md", torch.float32, 2.1e-3)
    assert merged.data.library_name == "transformers" and merged.data.base_model_relation == "finetune"
    assert "merged" in merged.data.tags and "peft" not in merged.data.tags
    assert merged.text.lstrip().startswith("# LoRA of HuggingFaceTB/SmolLM2-135M-Instruct\n\n**Merged model**")
    assert "0.0021" in merged.text and "| eval loss | 4.4000 | 0.2000 |" in merged.text
    ModelCard(str(merged), ignore_metadata_errors=False)


def test_summary_block_names_files_numbers_and_next_commands(tmp_path):
    settings = get_settings(["--output_dir", str(tmp_path)], env_file=None)
    summary = {"output_dir": str(tmp_path), "final_dir": str(tmp_path / "final"), "steps": 39, "train_loss": 0.41,
               "train_seconds": 152.3, "wall_seconds": 181.0, "tokens_seen": 46902,
               "results": {"eval_loss": {"before": 4.4421, "after": 0.196}},
               "peak_memory": {"cpu_max_rss_bytes": 2 * 2**30, "cuda_max_allocated_bytes": None},
               "files": {"loss.png": str(tmp_path / "loss.png")}}
    block = outputs.summary_block(summary, settings, "sft")
    assert "eval loss  4.4421 -> 0.1960" in block
    assert "39 steps, train loss 0.4100, 152 s training / 181 s total, 46,902 tokens, peak 2.00 GiB CPU (max RSS)" in block
    assert f"python examples/chat.py --adapter_dir {tmp_path / 'final'}" in block
    assert f"python examples/merge_adapter.py --adapter_dir {tmp_path / 'final'} --output_dir {tmp_path / 'merged'}" in block
    assert f"python examples/export_gguf.py --model_dir {tmp_path / 'merged'}" in block
    full = outputs.summary_block({**summary, "final_dir": str(tmp_path / "final-full")}, settings, "full")
    assert "merge_adapter" not in full and f"export_gguf.py --model_dir {tmp_path / 'final-full'}" in full


def test_tensorboard_events_of_an_evaluation_without_training_go_to_the_output_dir(tmp_path, monkeypatch):
    """transformers names the TensorBoard folder when training begins; an evaluate() alone wrote to ./runs."""
    import datasets

    from techniques.lora import apply_lora
    from techniques.sft import build_sft_trainer
    from tests.tiny import make_model, make_tokenizer

    monkeypatch.chdir(tmp_path)
    settings = get_settings(["--output_dir", str(tmp_path / "out")], env_file=None)
    rows = {"input_ids": [[1, 5, 6, 7, 2]], "attention_mask": [[1] * 5], "labels": [[-100, -100, 6, 7, 2]]}
    data = datasets.DatasetDict(train=datasets.Dataset.from_dict(rows), eval=datasets.Dataset.from_dict(rows))
    tokenizer = make_tokenizer("chatml")
    trainer = build_sft_trainer(apply_lora(make_model(tokenizer), settings), tokenizer, data, settings)
    trainer.evaluate()
    assert not (tmp_path / "runs").exists()
    [run_dir] = (tmp_path / "out" / "runs").iterdir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    [loss] = events.Scalars("eval/loss")
    assert loss.step == 0 and loss.value == pytest.approx(trainer.state.log_history[-1]["eval_loss"], rel=1e-6)
