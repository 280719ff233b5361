"""Every file in configs/ goes through accelerate's own launcher code and agrees with our settings.

FSDP and DeepSpeed cannot run on a CPU machine (accelerate ignores an FSDP config there, and
DeepSpeed needs CUDA), so these tests check what can be checked without GPUs: the environment
`accelerate launch` would give the training processes, the DeepSpeed JSON after transformers has
filled its "auto" values from our settings, and the FSDP wrap unit found on our model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from config import Settings
from techniques.sft import sft_config
from techniques.training import trainer_arguments

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# file -> (distributed type accelerate reads from it, extra environment it must produce)
EXPECTED = {
    "single_gpu.yaml": ("NO", {}),
    "multi_gpu.yaml": ("MULTI_GPU", {}),
    "fsdp2.yaml": ("FSDP", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
                            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}),
    "fsdp_qlora.yaml": ("FSDP", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_USE_ORIG_PARAMS": "false",
                                 "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}),
    "zero2.yaml": ("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true"}),
    "zero3.yaml": ("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}),
    "zero3_offload.yaml": ("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}),
    "multi_node.yaml": ("MULTI_GPU", {}),
}


def launch_env(config_file: Path) -> tuple[object, dict]:
    """(parsed launch args, environment) that `accelerate launch --config_file F script` gives each process."""
    args = launch_command_parser().parse_args(["--config_file", str(config_file), "examples/finetune_llm_lora.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # what accelerate's launch_command does before its DeepSpeed launcher
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_every_shipped_config_is_covered():
    assert sorted(p.name for p in (CONFIGS / "accelerate").glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_launches_and_defers_precision_to_our_setting(name, monkeypatch):
    distributed_type, expected_env = EXPECTED[name]
    text = (CONFIGS / "accelerate" / name).read_text()
    assert f"distributed_type: {distributed_type}" in text or f"distributed_type: '{distributed_type}'" in text
    args, env = launch_env(CONFIGS / "accelerate" / name)
    assert {key: env.get(key) for key in expected_env} == expected_env
    if name == "multi_node.yaml":  # torchrun's rendezvous arguments, not environment
        assert (args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port) == (2, 0, "10.0.0.1", 29500)
    # 'no' in the file = MIXED_PRECISION decides; trainer_arguments accepts the launch either way
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env["ACCELERATE_MIXED_PRECISION"])
    assert trainer_arguments(Settings(_env_file=None, mixed_precision="no"))["bf16"] is False


def test_a_launcher_precision_that_contradicts_the_setting_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match="mixed_precision=fp16.*MIXED_PRECISION=no"):
        trainer_arguments(Settings(_env_file=None, mixed_precision="no"))


# DeepSpeed keys that must stay "auto", so transformers fills them from our settings (one place to
# set each): micro batch, accumulation, global batch, clipping, precision.
AUTO_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("name", ["fsdp2.yaml", "fsdp_qlora.yaml", "zero2.yaml", "zero3.yaml"])
def test_fsdp_and_deepspeed_on_a_cpu_machine_are_refused_not_ignored(name, monkeypatch):
    """accelerate drops an FSDP config on CPU without a word; our trainers say so and name torchrun."""
    _, env = launch_env(CONFIGS / "accelerate" / name)
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        if key in env:
            monkeypatch.setenv(key, env[key])
    with pytest.raises(ValueError, match="needs CUDA GPUs.*torchrun --nproc_per_node"):
        trainer_arguments(Settings(_env_file=None))


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_json_leaves_batch_precision_and_optimizer_to_our_settings(name):
    _, env = launch_env(CONFIGS / "accelerate" / f"{name}.yaml")
    json_file = Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    assert json_file.resolve() == (CONFIGS / "deepspeed" / f"{name}.json").resolve()
    config = json.loads(json_file.read_text())
    assert {key: config[key] for key in AUTO_KEYS} == dict.fromkeys(AUTO_KEYS, "auto")
    assert config["bf16"] == {"enabled": "auto"} and config["fp16"] == {"enabled": "auto"}
    assert "optimizer" not in config and "scheduler" not in config  # the trainer's own (full FT: LLRD groups)
    zero = config["zero_optimization"]
    assert zero["stage"] == (2 if name == "zero2" else 3)
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # save_model writes whole weights
    assert zero.get("offload_optimizer", {}).get("device") == ("cpu" if name == "zero3_offload" else None)
    if name == "zero3_offload":  # a client optimizer on offloaded states must be allowed explicitly
        assert config["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (it needs CUDA to train)")
@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_deepspeed_auto_values_become_our_settings(name, precision):
    """DeepSpeed's config class, as the trainer uses it, fills the "auto" values from our settings."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    settings = Settings(_env_file=None, per_device_train_batch_size=3, gradient_accumulation_steps=5, max_grad_norm=0.7)
    args = sft_config(settings, bf16=precision == "bf16")
    ds = HfTrainerDeepSpeedConfig(json.loads((CONFIGS / "deepspeed" / f"{name}.json").read_text()))
    ds.trainer_config_process(args)
    assert ds.config["train_micro_batch_size_per_gpu"] == 3 and ds.config["gradient_accumulation_steps"] == 5
    assert ds.config["train_batch_size"] == 3 * 5 * args.world_size and ds.config["gradient_clipping"] == 0.7
    assert ds.config["bf16"]["enabled"] is (precision == "bf16")


def test_fsdp_wraps_each_decoder_layer_of_our_models(tmp_path, monkeypatch):
    """accelerate's FSDP plugin, built from the environment the launcher gives fsdp2.yaml, wraps
    the model's own decoder block class (TRANSFORMER_BASED_WRAP, no class named in the file)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    from tests.tiny_model import make_tiny_model_dir

    _, env = launch_env(CONFIGS / "accelerate" / "fsdp2.yaml")
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert (plugin.fsdp_version, plugin.reshard_after_forward, plugin.cpu_ram_efficient_loading) == (2, True, True)
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir(tmp_path))
    plugin.set_auto_wrap_policy(model)
    assert {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]} == {"LlamaDecoderLayer"}
