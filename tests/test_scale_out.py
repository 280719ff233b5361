"""The multi-process code paths a one-CPU test can reach without launching processes: the refusal
to train a model that evaluate() prepared unwrapped, QLoRA placement per rank and under FSDP,
FSDP1's refusal of the full fine-tune's LLRD optimizer, and DPO's held-out preference under
sharded weights. tests/test_distributed.py runs real 2-process DDP (slow); FSDP and DeepSpeed
need CUDA GPUs, so what they would be given is checked here by patching the flags the code reads.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from accelerate import Accelerator

from config import Settings, get_settings
from data.examples import build_sft_example
from models import load_model, load_tokenizer
from techniques import qlora
from techniques.full_finetune import build_optimizer
from techniques.lora import apply_lora
from techniques.sft import build_sft_trainer
from tests.tiny_model import make_tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import dpo as dpo_example  # noqa: E402

CONVERSATIONS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                 for q, a in [("Hi", "Hello!"), ("Name a colour.", "Blue."), ("Say yes.", "Yes.")]]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("scale_out"))


def sft_trainer(tiny, tmp_path, full: bool = False):
    """A one-process SFT trainer on the tiny model: LoRA, or full fine-tuning with the LLRD factory."""
    settings = get_settings(["--base_model_name", str(tiny), "--output_dir", str(tmp_path / "out"),
                             "--prompt_template", "chatml", "--report_to", "none"], env_file=None)
    tokenizer = load_tokenizer(settings, str(tiny))
    rows = [build_sft_example(c, tokenizer, "chatml", 512) for c in CONVERSATIONS]
    data = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "attention_mask", "labels")})
    model = load_model(settings, str(tiny), dtype=torch.float32)
    if full:
        return build_sft_trainer(model, tokenizer, datasets.DatasetDict(train=data, eval=data), settings,
                                 optimizer_factory=lambda m: build_optimizer(m, settings))
    return build_sft_trainer(apply_lora(model, settings), tokenizer, datasets.DatasetDict(train=data, eval=data), settings)


def test_train_after_a_pre_train_evaluate_under_two_processes_is_refused(tiny, tmp_path, monkeypatch):
    """evaluate() prepares the model for evaluation (flagged prepared, not wrapped); under N
    processes train() would then skip DDP and each rank would train its own copy (issue 9)."""
    trainer = sft_trainer(tiny, tmp_path)
    trainer.evaluate()
    assert trainer.model._is_accelerate_prepared and trainer.model_wrapped is trainer.model
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(RuntimeError, match=r"trainer\.evaluate\(\) ran before trainer\.train\(\) under 2 processes: "
                                           r".*separate copies\. Evaluate before training with eval_on_start=True"):
        trainer.train()


def test_qlora_places_each_rank_on_its_own_gpu_and_leaves_fsdp_to_place_shards():
    assert qlora.device_map(local_rank=1, cuda=True, fsdp=False) == {"": 1}  # not every rank on cuda:0
    assert qlora.device_map(local_rank=0, cuda=False, fsdp=False) == {"": "cpu"}
    assert qlora.device_map(local_rank=1, cuda=True, fsdp=True) is None


def test_load_4bit_model_asks_for_the_local_rank_s_gpu_and_fsdp_storage(monkeypatch):
    """load_4bit_model passes this process's local rank (and, under an FSDP launch, no device map
    and float storage) to from_pretrained; captured instead of loading on a GPU this machine lacks."""
    seen = []
    monkeypatch.setattr(qlora, "load_model", lambda settings, **kwargs: seen.append(kwargs) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(qlora, "PartialState", lambda cpu: SimpleNamespace(local_process_index=1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings = Settings(_env_file=None, bnb_4bit_compute_dtype="bfloat16")
    qlora.load_4bit_model(settings)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    qlora.load_4bit_model(settings)
    assert [kwargs["device_map"] for kwargs in seen] == [{"": 1}, None]
    assert [kwargs["quantization_config"].bnb_4bit_quant_storage for kwargs in seen] == [torch.uint8, torch.bfloat16]


@pytest.mark.parametrize("fsdp", [False, True])
def test_4bit_storage_is_the_compute_dtype_under_fsdp_only(monkeypatch, fsdp):
    """FSDP shards a layer's weights together only in one float dtype (PEFT's FSDP-QLoRA guide)."""
    if fsdp:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for compute in ("float32", "bfloat16"):
        settings = Settings(_env_file=None, bnb_4bit_compute_dtype=compute)
        expected = getattr(torch, compute) if fsdp else torch.uint8
        assert qlora.quant_storage_dtype(settings) == expected == qlora.bnb_config(settings).bnb_4bit_quant_storage
    explicit = Settings(_env_file=None, bnb_4bit_compute_dtype="bfloat16", bnb_4bit_quant_storage="float32")
    assert qlora.quant_storage_dtype(explicit) == torch.float32  # a set value wins


@pytest.mark.parametrize("version", [1, 2])
def test_full_fine_tuning_optimizer_factory_is_refused_under_fsdp1_only(tiny, tmp_path, monkeypatch, version):
    """FSDP1 renames and flattens the parameters the LLRD groups are built from; FSDP2 keeps them."""
    trainer = sft_trainer(tiny, tmp_path, full=True)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=version), raising=False)
    if version == 1:
        with pytest.raises(ValueError, match=r"needs FSDP2 .*configs/accelerate/fsdp2\.yaml\), DDP or DeepSpeed ZeRO"):
            trainer.create_optimizer()
    else:
        assert len(trainer.create_optimizer().param_groups) > 1  # our LLRD groups, not one default group


@pytest.mark.parametrize("trainer", [
    SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=False, accelerator=SimpleNamespace(state=SimpleNamespace())),
    SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=True,
                    accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))),
], ids=["fsdp", "zero3"])
def test_dpo_held_out_preference_under_sharded_weights_says_why_it_is_skipped(trainer, capsys, monkeypatch):
    """No process holds the whole policy under FSDP or ZeRO-3: the run prints why there is no
    held-out accuracy, as SFT does for its held-out answers, instead of leaving it out silently."""
    def no_scoring(*args, **kwargs):
        raise AssertionError("the sharded policy must not be scored")

    monkeypatch.setattr(dpo_example, "pair_log_probs", no_scoring)
    result = dpo_example.held_out_preference(None, [{"pair": 1}], None, None, trainer)
    assert list(result) == ["held_out_skipped"]
    assert result["held_out_skipped"].startswith("held-out preference skipped: ")
    assert ("FSDP shards" if trainer.is_fsdp_enabled else "ZeRO-3 partitions") in result["held_out_skipped"]
    dpo_example.print_measurement("after training", result)
    assert result["held_out_skipped"] in capsys.readouterr().out
