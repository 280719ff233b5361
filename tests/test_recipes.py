"""Every shipped recipe (recipes/*.yaml) loads, validates, and says how to run it."""

import re
from pathlib import Path

import pytest

from config import Settings, get_settings

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_the_four_recipes_are_shipped():
    assert [p.name for p in RECIPES] == ["cpu_demo.yaml", "dpo_on_sft_adapter.yaml", "full_llrd_multi_gpu.yaml",
                                         "qlora_8b_single_gpu.yaml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_its_commands_name_real_files(recipe):
    settings = get_settings(["--config", str(recipe)], env_file=None)
    set_keys = {line.split(":", 1)[0] for line in recipe.read_text().splitlines() if re.match(r"^[a-z_0-9]+:", line)}
    assert set_keys and set_keys <= settings.model_fields_set  # every key took effect
    commands = [line for line in recipe.read_text().splitlines() if "examples/" in line]
    assert any(f"--config recipes/{recipe.name}" in line for line in commands)
    for path in re.findall(r"(?:examples|configs/accelerate)/[\w./]+\.(?:py|yaml)", "\n".join(commands)):
        assert (REPO / path).is_file(), path


def test_the_recipes_set_what_their_names_say():
    load = {p.stem: get_settings(["--config", str(p)], env_file=None) for p in RECIPES}
    default = get_settings([], env_file=None).model_dump()
    # The CPU demo is the default run (the README's figures), spelled out.
    assert {k: v for k, v in load["cpu_demo"].model_dump().items() if default[k] != v} == {}
    assert "mixed_precision: bf16" in (REPO / "recipes" / "cpu_demo.yaml").read_text()
    qlora = load["qlora_8b_single_gpu"]
    assert qlora.load_in_4bit and qlora.bnb_4bit_quant_type == "nf4" and "8B" in qlora.base_model_name
    assert qlora.prompt_template == "llama3" and qlora.hf_token is None
    full = load["full_llrd_multi_gpu"]
    assert full.llrd_decay < 1 and full.learning_rate <= 5e-5
    dpo = load["dpo_on_sft_adapter"]
    assert dpo.sft_adapter_dir == "ft-outputs/final" and dpo.dpo_policy == "lora"
    assert Path(dpo.output_dir).resolve() != Path(load["cpu_demo"].output_dir).resolve()  # keeps the SFT adapter
    assert dpo.prompt_template == load["cpu_demo"].prompt_template and dpo.base_model_name == load["cpu_demo"].base_model_name
