"""Settings: sources and precedence, names, validation, secrets, .env.example sync."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

import config
from config import Settings, env_example_text, get_settings, resolve_precision, save_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No setting leaks in from the developer's shell."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_defaults_match_the_documented_ones():
    s = get_settings([], env_file=None)
    assert s.base_model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert s.output_dir == "./ft-outputs"
    assert (s.lora_r, s.lora_alpha, s.lora_target_modules) == (16, 32, ["all-linear"])
    assert (s.prompt_template, s.mixed_precision, s.load_in_4bit) == ("alpaca", "bf16", False)


def test_precedence_defaults_dotenv_environment_flags(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text("LORA_R=4\nLORA_ALPHA=8\nLEARNING_RATE=0.001\n")
    monkeypatch.setenv("LORA_ALPHA", "12")
    monkeypatch.setenv("LEARNING_RATE", "0.002")
    s = get_settings(["--learning_rate", "0.003"], env_file=env_file)
    assert s.lora_r == 4            # .env over default
    assert s.lora_alpha == 12       # environment over .env
    assert s.learning_rate == 0.003  # flag over environment
    assert s.lora_dropout == 0.0    # default


def test_seed_env_names(monkeypatch):
    monkeypatch.setenv("BASE_MODEL_NAME", "/models/x")
    monkeypatch.setenv("LOAD_IN_4BIT", "false")
    monkeypatch.setenv("LORA_R", "32")
    monkeypatch.setenv("LORA_ALPHA", "64")
    monkeypatch.setenv("LORA_TARGET_MODULES", "q_proj, v_proj,o_proj")
    monkeypatch.setenv("MAX_SEQ_LENGTH", "1024")
    monkeypatch.setenv("MIXED_PRECISION", "fp16")
    s = get_settings([], env_file=None)
    assert (s.base_model_name, s.load_in_4bit, s.lora_r, s.lora_alpha) == ("/models/x", False, 32, 64)
    assert s.lora_target_modules == ["q_proj", "v_proj", "o_proj"]
    assert (s.max_seq_length, s.mixed_precision) == (1024, "fp16")


def test_every_setting_env_name_is_its_upper_case_field_name(monkeypatch):
    monkeypatch.setenv("MAX_STEPS", "7")
    monkeypatch.setenv("OUTPUT_DIR", "/tmp/o")
    monkeypatch.setenv("PROMPT_TEMPLATE", "chatml")
    s = get_settings([], env_file=None)
    assert (s.max_steps, s.output_dir, s.prompt_template) == (7, "/tmp/o", "chatml")


def test_flags_accept_underscores_and_dashes():
    s = get_settings(["--lora_r", "32", "--lora-alpha", "16", "--use-dora", "true"], env_file=None)
    assert (s.lora_r, s.lora_alpha, s.use_dora) == (32, 16, True)


def test_help_lists_every_setting_with_description_default_and_env_name(capsys):
    with pytest.raises(SystemExit):
        get_settings(["--help"], env_file=None)
    text = " ".join(capsys.readouterr().out.split())
    for name, info in Settings.model_fields.items():
        assert f"--{name}" in text
        assert f"env: {name.upper()}" in text
        assert " ".join(info.description.split())[:40] in text
    assert "[default: 16; env: LORA_R]" in text


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValidationError) as err:
        get_settings(["--lora_r", "0", "--lora_alpha", "inf", "--lora_dropout", "1.0",
                      "--prompt_template", "vicuna", "--mixed_precision", "fp8",
                      "--dataset_format", "xml"], env_file=None)
    fields = {e["loc"][0] for e in err.value.errors()}
    assert fields == {"lora_r", "lora_alpha", "lora_dropout", "prompt_template", "mixed_precision", "dataset_format"}


@pytest.mark.parametrize("flag,value", [("--lora_alpha", "0"), ("--lora_alpha", "-1"), ("--lora_alpha", "nan"),
                                        ("--lora_dropout", "-0.1"), ("--max_steps", "0"),
                                        ("--eval_split_size", "2.5"), ("--lora_target_modules", " , ")])
def test_bad_values_are_rejected(flag, value):
    with pytest.raises(ValidationError) as err:
        get_settings([flag, value], env_file=None)
    assert err.value.errors()[0]["loc"][0] == flag.removeprefix("--")


def test_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ValidationError, match="load_in_4bit=true needs a working bitsandbytes"):
        get_settings(["--load_in_4bit", "true"], env_file=None)


def test_cpu_precision_is_bf16_only_with_native_bf16(monkeypatch, caplog):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    s = get_settings(["--mixed_precision", "bf16"], env_file=None)
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision(s) == "bf16" and not caplog.text
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision(s) == "no"
    assert "no native bf16" in caplog.text and "trains in fp32" in caplog.text
    assert resolve_precision(get_settings(["--mixed_precision", "no"], env_file=None)) == "no"


def test_native_bf16_follows_the_cpu_flags(monkeypatch, real_cpu_bf16_check):
    import torch

    for avx512_bf16, amx, expected in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert config.cpu_has_native_bf16() is expected


def test_frozen_weights_load_in_bf16_when_the_matmuls_are_bf16(monkeypatch):
    import torch

    from models import frozen_weight_dtype

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: True)
    assert frozen_weight_dtype(get_settings([], env_file=None)) is torch.bfloat16
    assert frozen_weight_dtype(get_settings(["--mixed_precision", "no"], env_file=None)) == "auto"
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: False)
    assert frozen_weight_dtype(get_settings([], env_file=None)) == "auto"


def test_bf16_on_gpu_without_bf16_is_an_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="MIXED_PRECISION=fp16"):
        resolve_precision(get_settings([], env_file=None))


def test_hf_token_never_printed_or_saved(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_TOPSECRET123")
    s = get_settings([], env_file=None)
    assert s.hf_token.get_secret_value() == "hf_TOPSECRET123"
    print(s, repr(s))
    saved = save_settings(s, tmp_path / "run_settings.json").read_text()
    assert "TOPSECRET" not in capsys.readouterr().out
    assert "TOPSECRET" not in saved and "hf_token" not in json.loads(saved)
    with pytest.raises(ValidationError) as err:
        get_settings(["--hf_token", "hf_TOPSECRET123", "--lora_r", "0"], env_file=None)
    assert "TOPSECRET" not in str(err.value)


def test_empty_values_in_a_copied_env_example_mean_defaults(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(env_example_text())
    assert get_settings([], env_file=env_file).model_dump() == get_settings([], env_file=None).model_dump()


def test_env_example_is_in_sync_with_settings():
    text = (REPO / ".env.example").read_text()
    assert text == env_example_text(), "run `python config.py` to regenerate .env.example"
    keys = [line.split("=", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert keys == [name.upper() for group in config.GROUPS for name in group.model_fields]
    assert sorted(keys) == sorted(name.upper() for name in Settings.model_fields)


def test_settings_is_every_group():
    s = get_settings([], env_file=None)
    assert all(isinstance(s, group) for group in config.GROUPS)


def test_a_script_with_bad_settings_exits_with_one_line_per_field(tmp_path):
    """From the command line, bad values give a short message naming flag and env, not a traceback."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO)!r})\nfrom config import get_settings\nget_settings()\n")
    result = subprocess.run([sys.executable, str(script), "--lora_r", "0", "--prompt_template", "vicuna"],
                            capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--lora_r / LORA_R: Input should be greater than or equal to 1" in result.stderr
    assert "--prompt_template / PROMPT_TEMPLATE: Input should be 'alpaca'" in result.stderr


# ---------------------------------------------------------------- recipes (--config x.yaml) and --help


def test_precedence_defaults_recipe_dotenv_environment_flags(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora_r: 4\nlora_alpha: 8\nlora_dropout: 0.1\nlearning_rate: 1.0e-4\nseed: 1\n"
                      "lora_target_modules: [q_proj, v_proj]\n")
    env_file = tmp_path / ".env"
    env_file.write_text("LORA_DROPOUT=0.2\nLEARNING_RATE=2e-4\nSEED=2\n")
    monkeypatch.setenv("LEARNING_RATE", "3e-4")
    monkeypatch.setenv("SEED", "3")
    s = get_settings(["--config", str(recipe), "--seed", "4"], env_file=env_file)
    assert (s.lora_r, s.lora_alpha, s.lora_target_modules) == (4, 8, ["q_proj", "v_proj"])  # recipe over defaults
    assert s.lora_dropout == 0.2       # .env over recipe
    assert s.learning_rate == 3e-4     # environment over .env
    assert s.seed == 4                 # flag over environment
    assert s.max_seq_length == 512     # default
    assert "lora_r" in s.model_fields_set  # a recipe value counts as set (full_finetune reads this for its LR)
    assert get_settings([], env_file=None).lora_r == 16  # the recipe applied to that one call only


@pytest.mark.parametrize("text,message", [
    ("lora_rank: 8\nlearning_rte: 1e-4\n", "'lora_rank' is not a setting (did you mean lora_r?); "
                                         "'learning_rte' is not a setting (did you mean learning_rate?)"),
    ("hf_token: hf_abc\n", "'hf_token' is a secret: set HF_TOKEN in the environment or .env"),
    ("- lora_r\n", "expected a mapping of setting names to values, got list"),
    ("lora_r: [1\n", "not valid YAML"),
])
def test_bad_recipes_are_refused_naming_the_key(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(config.RecipeError) as err:
        get_settings(["--config", str(recipe)], env_file=None)
    assert str(recipe) in str(err.value) and message in str(err.value)
    assert "hf_abc" not in str(err.value)


def test_a_missing_recipe_is_an_error(tmp_path):
    with pytest.raises(config.RecipeError, match="no such file"):
        get_settings(["--config", str(tmp_path / "nope.yaml")], env_file=None)


def test_recipe_values_are_validated_like_any_other(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lora_r: 0\nprompt_template: vicuna\n")
    with pytest.raises(ValidationError) as err:
        get_settings(["--config", str(recipe)], env_file=None)
    assert {e["loc"][0] for e in err.value.errors()} == {"lora_r", "prompt_template"}


def test_a_script_with_a_bad_recipe_exits_with_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "recipe.yaml").write_text("lora_rank: 8\n")
    script = tmp_path / "run.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO)!r})\nfrom config import get_settings\nget_settings()\n")
    result = subprocess.run([sys.executable, str(script), "--config", "recipe.yaml"],
                            capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("recipe recipe.yaml: 'lora_rank' is not a setting (did you mean lora_r?)")


def test_help_lists_sections_with_the_script_s_own_first(capsys):
    def section_order(sections):
        with pytest.raises(SystemExit):
            get_settings(["--help"], env_file=None, sections=sections)
        return [line.removesuffix(" settings:") for line in capsys.readouterr().out.splitlines()
                if line.endswith(" settings:")]

    assert section_order(()) == ["model", "lora", "qlora", "training", "data", "full_ft", "dpo"]
    assert section_order(("model", "dpo", "lora", "qlora", "training", "data")) == [
        "model", "dpo", "lora", "qlora", "training", "data", "full_ft"]
    with pytest.raises(ValueError, match="unknown settings sections"):
        config.build_parser(sections=("fullft",))


def test_liger_kernels_need_cuda_and_the_package(monkeypatch):
    import importlib.util

    s = get_settings(["--use_liger_kernel", "true"], env_file=None)
    config.check_kernels(get_settings([], env_file=None))  # off: nothing to check
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match="use_liger_kernel=true needs a CUDA GPU"):
        config.check_kernels(s)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install liger-kernel"):
        config.check_kernels(s)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="Liger's kernels need a CUDA GPU")
def test_liger_kernels_reach_the_sft_config_on_a_gpu():
    pytest.importorskip("liger_kernel")
    from techniques.sft import sft_config

    assert sft_config(get_settings(["--use_liger_kernel", "true"], env_file=None)).use_liger_kernel
