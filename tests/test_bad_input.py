"""Malformed inputs end in one clear message and exit status 2, never a traceback.

Each case of `CASES` runs an example script's `main` through `runs.cli.run`, the scripts' entry
point, in this process, and checks the exit status (2), the text its message must contain (which
names the setting, file, line, record or field), and that no traceback was printed. Nearly all
fail before a model loads; those needing a model use the tiny one. `test_scripts_exit_2_for_real`
runs one case of each kind of error as a real subprocess (the shell's exit status, stderr).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from config import Settings, save_settings
from runs import cli
from tests.tiny_model import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import chat  # noqa: E402
import dpo  # noqa: E402
import finetune_llm_lora  # noqa: E402
import full_finetune  # noqa: E402
import merge_adapter  # noqa: E402

SCRIPTS = {"lora": finetune_llm_lora, "full": full_finetune, "dpo": dpo, "chat": chat, "merge": merge_adapter}
GOOD_SFT = '{"instruction": "Say hi.", "output": "Hi."}\n'


@dataclass
class Case:
    """`script` run with `argv` (`{tmp}`, `{tiny}`, `{other}`, `{adapter}` filled in), `env`
    variables, a `.env` file and data `files` (name -> text or bytes) in a fresh folder; its
    message must contain `expect`."""

    id: str
    script: str
    argv: list[str]
    expect: str
    env: dict = field(default_factory=dict)
    dotenv: str | None = None
    files: dict = field(default_factory=dict)


def sft(*flags: str) -> list[str]:
    return ["--base_model_name", "{tiny}", "--output_dir", "{tmp}/out", "--max_steps", "1",
            "--dataset_path", "{tmp}/good.jsonl", "--eval_split_size", "0", *flags]


def data(text: str | bytes, name: str = "data.jsonl", *flags: str) -> dict:
    return dict(argv=sft("--dataset_path", f"{{tmp}}/{name}", *flags), files={name: text})


def dpo_with(*flags: str) -> list[str]:
    return ["--base_model_name", "{tiny}", "--output_dir", "{tmp}/out", "--max_steps", "1", "--eval_split_size", "0",
            "--dpo_dataset_path", "{tmp}/pairs.jsonl", *flags]


PAIRS = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "c", "rejected": "d"}\n'
CHECKPOINT_STATE = json.dumps({"global_step": 4})
PARQUET = "parquet"  # files value: a parquet file with columns a, b

CASES = [
    # ---- settings: .env, environment, flags (before anything loads)
    Case("dotenv-unknown-key", "lora", sft(), "LORA_RANK (.env): not a setting; did you mean LORA_R?", dotenv="LORA_RANK=8\n"),
    Case("recipe-unknown-key", "lora", sft("--config", "{tmp}/r.yaml"), "recipe {tmp}/r.yaml: 'lora_rank' is not a setting (did you mean lora_r?)",
         files={"r.yaml": "lora_rank: 8\n"}),
    Case("dotenv-foreign-variable", "lora", sft(), "HF_HUB_OFFLINE (.env): not a setting", dotenv="HF_HUB_OFFLINE=1\n"),
    Case("env-misspelled", "lora", sft(), "LORA_ALHPA (environment): not a setting; did you mean LORA_ALPHA?",
         env={"LORA_ALHPA": "8"}),
    Case("env-bad-value", "lora", sft(), "--lora_r / LORA_R: Input should be a valid integer", env={"LORA_R": "big"}),
    Case("flag-not-an-int", "lora", sft("--lora_r", "abc"), "--lora_r / LORA_R: Input should be a valid integer"),
    Case("lora-r-zero", "lora", sft("--lora_r", "0"), "--lora_r / LORA_R: Input should be greater than or equal to 1"),
    Case("dropout-out-of-range", "lora", sft("--lora_dropout", "1.5"), "--lora_dropout / LORA_DROPOUT: Input should be less than 1"),
    Case("lr-negative", "lora", sft("--learning_rate", "-1"), "--learning_rate / LEARNING_RATE: Input should be greater than 0"),
    Case("lr-nan", "lora", sft("--learning_rate", "nan"), "--learning_rate / LEARNING_RATE: Input should be a finite number"),
    Case("max-steps-zero", "lora", sft("--max_steps", "0"), "--max_steps / MAX_STEPS: Value error, must be -1"),
    Case("batch-zero", "lora", sft("--per_device_train_batch_size", "0"), "--per_device_train_batch_size / PER_DEVICE_TRAIN_BATCH_SIZE"),
    Case("bool-garbage", "lora", sft("--use_dora", "maybe"), "--use_dora / USE_DORA: Input should be a valid boolean"),
    Case("unknown-template", "lora", sft("--prompt_template", "vicuna"), "--prompt_template / PROMPT_TEMPLATE: Input should be 'alpaca'"),
    Case("unknown-format", "lora", sft("--dataset_format", "xml"), "--dataset_format / DATASET_FORMAT: Input should be 'auto'"),
    Case("unknown-scheduler", "lora", sft("--lr_scheduler_type", "cosnie"), "--lr_scheduler_type / LR_SCHEDULER_TYPE: Value error, must be one of linear, cosine"),
    Case("unknown-precision", "lora", sft("--mixed_precision", "fp8"), "--mixed_precision / MIXED_PRECISION: Input should be 'bf16'"),
    Case("unknown-loss-type", "dpo", dpo_with("--loss_type", "sigmiod"), "--loss_type / LOSS_TYPE: Value error, must be one of sigmoid"),
    Case("unknown-optimizer", "full", sft("--optim", "sgd"), "--optim / OPTIM: Value error, must be one of adamw_torch"),
    Case("save-total-limit-zero", "lora", sft("--save_total_limit", "0"), "--save_total_limit / SAVE_TOTAL_LIMIT: Input should be greater than or equal to 1"),
    Case("eval-split-fraction-count", "lora", sft("--eval_split_size", "2.5"), "--eval_split_size / EVAL_SPLIT_SIZE: Value error, must be 0, a fraction"),
    Case("bad-role-map", "lora", sft("--role_map", "observation"), "--role_map / ROLE_MAP: Value error, expected from:to pairs"),
    Case("empty-target-modules", "lora", sft("--lora_target_modules", " , "), "--lora_target_modules / LORA_TARGET_MODULES: Value error, give module names"),
    Case("label-smoothing-range", "dpo", dpo_with("--label_smoothing", "0.7"), "--label_smoothing / LABEL_SMOOTHING: Input should be less than 0.5"),
    Case("unknown-flag", "lora", sft("--lora_rank", "8"), "unrecognized arguments: --lora_rank 8"),
    # ---- the output dir and the resume point (before any model loads)
    Case("output-dir-is-a-file", "lora", sft("--output_dir", "{tmp}/a-file"), "OUTPUT_DIR={tmp}/a-file is a file, not a folder",
         files={"a-file": "x"}),
    Case("output-dir-not-writable", "lora", sft("--output_dir", "{unwritable}"), "OUTPUT_DIR={unwritable} is not writable"),
    Case("output-dir-holds-a-finished-run", "lora", sft(), "OUTPUT_DIR={tmp}/out already holds a finished run (final/)",
         files={"out/final/adapter_config.json": "{}"}),
    Case("output-dir-holds-checkpoints", "full", sft(), "already holds checkpoints of an unfinished run (checkpoint-4)",
         files={"out/checkpoint-4/trainer_state.json": CHECKPOINT_STATE}),
    Case("resume-missing-folder", "lora", sft("--resume_from_checkpoint", "{tmp}/nowhere/checkpoint-8"), "RESUME_FROM_CHECKPOINT={tmp}/nowhere/checkpoint-8: no such folder"),
    Case("resume-incomplete-checkpoint", "lora", sft("--resume_from_checkpoint", "{tmp}/out/checkpoint-8"),
         "is not a complete checkpoint (a checkpoint-N folder whose trainer_state.json is at step N; a save cut short leaves none); complete ones there: checkpoint-4",
         files={"out/checkpoint-8/adapter_model.safetensors": "", "out/checkpoint-4/trainer_state.json": CHECKPOINT_STATE}),
    Case("resume-auto-finished-run", "dpo", dpo_with("--resume_from_checkpoint", "auto"), "holds a finished run (final/) and no checkpoint to continue from",
         files={"out/final/adapter_config.json": "{}", "pairs.jsonl": PAIRS}),
    Case("resume-and-overwrite", "lora", sft("--resume_from_checkpoint", "auto", "--overwrite_output_dir", "true"),
         "RESUME_FROM_CHECKPOINT and OVERWRITE_OUTPUT_DIR=true contradict each other", files={"out/final/x": ""}),
    Case("fp16-on-cpu", "lora", sft("--mixed_precision", "fp16"), "mixed_precision=fp16 needs a CUDA GPU and none is visible"),
    Case("liger-on-cpu", "lora", sft("--use_liger_kernel", "true"), "use_liger_kernel=true needs a CUDA GPU"),
    # ---- the model
    Case("model-folder-empty", "lora", sft("--base_model_name", "{tmp}/empty"), "exists but lacks config.json", files={"empty/.keep": ""}),
    Case("model-is-an-adapter-folder", "lora", sft("--base_model_name", "{adapter}"), "it is a LoRA adapter folder, not a model"),
    Case("model-corrupt-gguf", "lora", sft("--base_model_name", "{tmp}/model.gguf"), "model.gguf is not a readable GGUF file",
         files={"model.gguf": bytes(range(256)) * 8}),
    Case("model-truncated-gguf", "lora", sft("--base_model_name", "{tmp}/cut.gguf"), "cut.gguf is not a readable GGUF file",
         files={"cut.gguf": b"GGUF\x03\x00\x00\x00\x05\x00"}),
    Case("model-file-not-gguf", "lora", sft("--base_model_name", "{tmp}/weights.txt"), "is a file but not a .gguf file", files={"weights.txt": "x"}),
    Case("model-hub-id-offline", "lora", sft("--base_model_name", "some-org/some-model"), "Hugging Face Hub: skipped: HF_HUB_OFFLINE is set",
         env={"HF_HUB_OFFLINE": "1"}),
    Case("model-pickle-weights-only", "lora", sft("--base_model_name", "{pickled}"), "it has only pickle weights, pytorch_model*.bin, which can run code"),
    Case("model-corrupt-safetensors", "lora", sft("--base_model_name", "{corrupt}"), "cannot load the model in {corrupt}: SafetensorError"),
    Case("target-modules-match-nothing", "lora", sft("--lora_target_modules", "q_proj,qkv_proj"),
         "lora_target_modules: qkv_proj match no module of LlamaForCausalLM. Its linear layers are: down_proj, gate_proj, k_proj"),
    Case("llama3-tokens-missing", "lora", sft("--prompt_template", "llama3"),
         "prompt template 'llama3' cannot be used with this tokenizer: not single tokens in this tokenizer: ['<|start_header_id|>', "
         "'<|end_header_id|>', '<|eot_id|>']. Fix: use PROMPT_TEMPLATE=alpaca or chatml or tokenizer"),
    Case("phi3-tokens-missing", "lora", sft("--prompt_template", "phi3"),
         "not single tokens in this tokenizer: ['<|system|>', '<|user|>', '<|assistant|>', '<|end|>']. Fix: use PROMPT_TEMPLATE="
         "alpaca or chatml or tokenizer"),
    Case("freeze-more-layers-than-exist", "full", sft("--freeze_layers", "9"), "freeze_layers=9: LlamaForCausalLM has only 2 decoder layers"),
    # ---- SFT data
    Case("data-missing-file", "lora", sft("--dataset_path", "{tmp}/missing.jsonl"), "data error in {tmp}/missing.jsonl\n  no such local file"),
    Case("data-empty-file", "lora", **data(""), expect="data error in {tmp}/data.jsonl\n  the file holds no records"),
    Case("data-not-json", "lora", **data("{nope", "data.json"), expect="data error in {tmp}/data.json\n  invalid JSON at line 1, column 2"),
    Case("data-jsonl-broken-line", "lora", **data(GOOD_SFT * 2 + '{"instruction": "x", "output": \n' + GOOD_SFT * 2),
         expect="data error in {tmp}/data.jsonl\n  invalid JSON on line 3"),
    Case("data-missing-field", "lora", **data(GOOD_SFT + '{"instruction": "x"}\n'), expect="data.jsonl\n  record 1, field 'output': missing field"),
    Case("data-wrong-type", "lora", **data('{"instruction": 5, "output": "y"}\n'),
         expect="record 0, field 'instruction': expected a string, got int"),
    Case("data-unknown-role", "lora", **data('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n'),
         expect="record 0, field 'messages[1].role': unknown role 'bot'"),
    Case("data-empty-conversation", "lora", **data('{"messages": []}\n'), expect="record 0, field 'messages': empty conversation"),
    Case("data-ends-with-user", "lora",
         **data('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}\n'),
         expect="record 0, field 'messages[2].role': the conversation ends with a 'user' turn that nothing answers"),
    Case("data-two-user-turns", "lora",
         **data('{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]}\n'),
         expect="field 'conversations[1].from': two consecutive 'user' turns"),
    Case("data-not-utf8", "lora", **data(GOOD_SFT.encode() + '{"instruction": "café", "output": "x"}\n'.encode("latin-1")),
         expect="data.jsonl\n  not UTF-8 text: byte 0xe9 on line 2, column 21"),
    Case("data-csv-wrong-columns", "lora", **data("a,b\n1,2\n", "data.csv"),
         expect="data.csv\n  record 0: cannot detect the format from keys ['a', 'b']"),
    Case("data-parquet-wrong-columns", "lora", **data(PARQUET, "data.parquet"),
         expect="data.parquet\n  record 0: cannot detect the format from keys ['a', 'b']"),
    Case("data-unsupported-suffix", "lora", **data("hello", "data.txt"), expect="data.txt\n  unsupported file type '.txt'"),
    Case("data-json-not-records", "lora", **data("42", "data.json"), expect="expected a list of records or one object, got int"),
    Case("data-missing-eval-file", "lora", sft("--eval_dataset_path", "{tmp}/eval.jsonl"), "data error in {tmp}/eval.jsonl\n  no such local file"),
    Case("data-eval-split-too-big", "lora", sft("--eval_split_size", "5"), "eval_split_size=5.0 holds out 5 of 1 records, leaving none"),
    # ---- preference data and DPO settings
    Case("pairs-missing-rejected", "dpo", dpo_with(), "pairs.jsonl\n  record 1, field 'rejected': missing field",
         files={"pairs.jsonl": PAIRS.splitlines()[0] + '\n{"prompt": "q", "chosen": "c"}\n'}),
    Case("pairs-chosen-equals-rejected", "dpo", dpo_with(), "2 of the pairs have chosen == rejected (records 0, 2)",
         files={"pairs.jsonl": '{"prompt": "p", "chosen": "a", "rejected": "a"}\n' + PAIRS.splitlines()[1] + '\n'
                + '{"prompt": "r", "chosen": "e", "rejected": "e"}\n'}),
    Case("sft-adapter-not-an-adapter", "dpo", dpo_with("--sft_adapter_dir", "{tmp}/empty"), "holds no adapter_config.json: not a PEFT adapter folder",
         files={"empty/.keep": "", "pairs.jsonl": PAIRS}),
    Case("sft-adapter-for-another-base", "dpo", dpo_with("--sft_adapter_dir", "{adapter}", "--base_model_name", "{other}"),
         "was trained for another base model", files={"pairs.jsonl": PAIRS}),
    Case("dpo-full-on-4-bit", "dpo", dpo_with("--dpo_policy", "full", "--load_in_4bit", "true"),
         "dpo_policy=full cannot train 4-bit weights", files={"pairs.jsonl": PAIRS}),
    Case("dpo-smoothing-ignored", "dpo", dpo_with("--loss_type", "hinge", "--label_smoothing", "0.1"),
         "label_smoothing=0.1 has no effect on loss_type=hinge", files={"pairs.jsonl": PAIRS}),
    # ---- chat and merge
    Case("chat-adapter-for-another-base", "chat", ["--adapter_dir", "{adapter}", "--base_model_name", "{other}", "--prompt", "hi"],
         "was trained for another base model ({tiny}): its model.layers.0.mlp.down_proj takes 64 in features, "
         "but the base {other} has 96 in features there"),
    Case("merge-adapter-for-another-base", "merge", ["--adapter_dir", "{adapter}", "--base_model_name", "{other}", "--output_dir", "{tmp}/merged"],
         "was trained for another base model"),
    Case("chat-adapter-dir-not-an-adapter", "chat", ["--adapter_dir", "{tmp}/empty", "--prompt", "hi"],
         "holds neither run_settings.json nor adapter_config.json", files={"empty/.keep": ""}),
    Case("chat-model-dir-not-a-model", "chat", ["--model_dir", "{tmp}/empty", "--prompt", "hi"], "cannot load the model in {tmp}/empty",
         files={"empty/.keep": ""}),
    Case("merge-output-dir-not-empty", "merge", ["--adapter_dir", "{adapter}", "--output_dir", "{tmp}/merged"],
         "--output_dir {tmp}/merged exists and is not empty", files={"merged/x": ""}),
    Case("merge-output-dir-is-a-file", "merge", ["--adapter_dir", "{adapter}", "--output_dir", "{tmp}/merged"],
         "--output_dir {tmp}/merged is a file", files={"merged": "x"}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """The tiny model, a model of another shape, an adapter trained on the tiny one, and broken model folders."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from models import load_model
    from techniques.lora import apply_lora

    root = tmp_path_factory.mktemp("bad-input-models")
    tiny = make_tiny_model_dir(root)
    other = root / "other-shape"
    config = LlamaConfig.from_pretrained(tiny)
    config.hidden_size, config.intermediate_size = 48, 96
    LlamaForCausalLM(config).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((tiny / name).read_bytes())
    settings = Settings(_env_file=None, base_model_name=str(tiny), lora_r=4)
    adapter = root / "adapter"
    apply_lora(load_model(settings, str(tiny)), settings).save_pretrained(adapter)
    save_settings(settings, adapter / "run_settings.json")
    pickled = make_tiny_model_dir(root, name="pickled")
    torch.save(AutoModelForCausalLM.from_pretrained(pickled).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    corrupt = make_tiny_model_dir(root, name="corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    return {"tiny": str(tiny), "other": str(other), "adapter": str(adapter), "pickled": str(pickled), "corrupt": str(corrupt)}


def unwritable_dir(tmp_path: Path) -> str:
    if os.geteuid() == 0:  # root writes through permission bits; /sys refuses new files even to root
        return "/sys/ft-kit-test-run"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return str(locked / "run")


def prepare(case: Case, tmp_path: Path, models: dict, monkeypatch) -> tuple[list[str], dict]:
    """Write the case's files and .env into tmp_path, set its environment; return its argv and the
    values filled into it."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network for hub-like names
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.jsonl").write_text(GOOD_SFT)
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == PARQUET:
            pq.write_table(pa.table({"a": [1], "b": [2]}), path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    if case.dotenv is not None:
        (tmp_path / ".env").write_text(case.dotenv)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    values = {**models, "tmp": str(tmp_path), "unwritable": unwritable_dir(tmp_path) if "{unwritable}" in " ".join(case.argv) else ""}
    return [arg.format(**values) for arg in case.argv], values


def test_the_table_is_big_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_one_clear_message_and_exit_status_2(case, tmp_path, models, monkeypatch, capsys):
    argv, values = prepare(case, tmp_path, models, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(SCRIPTS[case.script].main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert case.expect.format(**values) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "final").is_dir() or "final" in " ".join(case.files)  # nothing written as final


# One case per kind of error (settings from .env, argparse, output dir, model, data, a technique's
# check, chat/merge), run as scripts: the exit status and stderr of real processes. They run as
# forked children of one process that imported the examples once (tests/forked_scripts.py), and
# the data case also as a plain `python examples/finetune_llm_lora.py ...`.
REAL = ["dotenv-unknown-key", "unknown-flag", "output-dir-holds-a-finished-run", "model-corrupt-gguf",
        "data-jsonl-broken-line", "target-modules-match-nothing", "merge-adapter-for-another-base"]


def test_scripts_exit_2_for_real(tmp_path, models, monkeypatch):
    jobs, expected = [], []
    for case in (c for c in CASES if c.id in REAL):
        folder = tmp_path / case.id
        folder.mkdir()
        argv, values = prepare(case, folder, models, monkeypatch)
        script = str(REPO / "examples" / f"{SCRIPTS[case.script].__name__}.py")
        jobs.append({"script": script, "argv": argv, "cwd": str(folder), "log": str(folder / "log"),
                     "env": {**os.environ, "OMP_NUM_THREADS": "1"}})
        expected.append((case, values))
    assert len(jobs) == len(REAL)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, str(REPO / "tests" / "forked_scripts.py"), str(tmp_path / "jobs.json"),
                    str(tmp_path / "statuses.json")], check=True, timeout=600)
    statuses = json.loads((tmp_path / "statuses.json").read_text())
    for (case, values), job, status in zip(expected, jobs, statuses, strict=True):
        log = Path(job["log"]).read_text()
        assert status == 2, (case.id, log[-2000:])
        assert case.expect.format(**values) in log, case.id
        assert "Traceback" not in log, case.id

    plain = next(job for job, (case, _) in zip(jobs, expected) if case.id == "data-jsonl-broken-line")
    result = subprocess.run([sys.executable, plain["script"], *plain["argv"]], cwd=plain["cwd"], env=plain["env"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert "invalid JSON on line 3" in result.stderr
