"""LoRA and QLoRA techniques on a tiny random Llama: targets, merge equality, 4-bit gradients."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import tests.tiny_model as tiny_model
from config import get_settings
from models import load_model
from techniques.lora import apply_lora, count_parameters, load_lora, merge_and_save_lora
from tests.tiny_model import make_tiny_model_dir

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 40, 60, 80, 100, 120, 140, 160]])


def settings_for(model_dir, *flags):
    return get_settings(["--base_model_name", str(model_dir), "--lora_dropout", "0", *flags], env_file=None)


def randomize_lora_b(model, seed=0):
    """LoRA B starts at zero (the adapter is a no-op); give it values so merges are tested for real."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


@pytest.fixture
def tiny_dir(tmp_path):
    return make_tiny_model_dir(tmp_path)


def test_apply_lora_counts_exact_trainable_parameters(tiny_dir):
    s = settings_for(tiny_dir, "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj")
    model = apply_lora(load_model(s, path=str(tiny_dir)), s)
    # per layer: q_proj 32->32 and v_proj 32->16 (2 kv heads x 8): r*(in+out) each
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == expected + sum(p.numel() for p in load_model(s, path=str(tiny_dir)).parameters())


def test_unknown_target_module_lists_the_linear_layers(tiny_dir):
    s = settings_for(tiny_dir, "--lora_target_modules", "q_proj,qproj")
    with pytest.raises(ValueError) as err:
        apply_lora(load_model(s, path=str(tiny_dir)), s)
    message = str(err.value)
    assert "qproj" in message and "lora_target_modules" in message
    for name in ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"):
        assert name in message


def test_all_linear_targets_every_projection_but_the_head(tiny_dir):
    s = settings_for(tiny_dir, "--lora_target_modules", "all-linear")
    model = apply_lora(load_model(s, path=str(tiny_dir)), s)
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("tie", [True, False])
def test_merged_folder_loads_in_plain_transformers_with_equal_logits(tmp_path, tie):
    model_dir = make_tiny_model_dir(tmp_path, tie_word_embeddings=tie)
    s = settings_for(model_dir)
    model = apply_lora(load_model(s, path=str(model_dir)), s)
    randomize_lora_b(model)
    expected = logits(model)
    base_logits = logits(load_model(s, path=str(model_dir)))
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter really changes the model

    diff = merge_and_save_lora(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    assert diff <= 1e-4
    assert (logits(merged) - expected).abs().max().item() <= 1e-4


def test_failed_merge_leaves_no_output_dir(tiny_dir, tmp_path, monkeypatch):
    s = settings_for(tiny_dir)
    model = apply_lora(load_model(s, path=str(tiny_dir)), s)
    randomize_lora_b(model)
    monkeypatch.setitem(__import__("techniques.lora").lora.MERGE_TOLERANCE, torch.float32, -1.0)
    with pytest.raises(ValueError, match="differs from the adapter model"):
        merge_and_save_lora(model, tmp_path / "out" / "merged")
    assert not (tmp_path / "out" / "merged").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left behind either


def test_saved_adapter_reloads_with_the_same_logits(tiny_dir, tmp_path):
    s = settings_for(tiny_dir)
    model = apply_lora(load_model(s, path=str(tiny_dir)), s)
    randomize_lora_b(model)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_lora(load_model(s, path=str(tiny_dir)), tmp_path / "adapter")
    assert torch.equal(logits(reloaded), expected)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(load_model(s, path=str(tiny_dir)), tmp_path)


# ---------------------------------------------------------------- QLoRA (bitsandbytes CPU backend)


@pytest.fixture
def tiny_dir_64(tmp_path, monkeypatch):
    """bitsandbytes' CPU 4-bit kernel needs in_features >= its 64-wide quantization block."""
    monkeypatch.setitem(tiny_model.TINY_CONFIG, "hidden_size", 64)
    monkeypatch.setitem(tiny_model.TINY_CONFIG, "intermediate_size", 128)
    return make_tiny_model_dir(tmp_path, name="tiny-64")


def test_qlora_trains_lora_weights_through_gradient_checkpointing(tiny_dir_64):
    import bitsandbytes as bnb

    from techniques.qlora import apply_qlora, load_4bit_model

    s = settings_for(tiny_dir_64, "--load_in_4bit", "true", "--gradient_checkpointing", "true")
    model = apply_qlora(load_4bit_model(s, str(tiny_dir_64)), s)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert model.base_model.model.model.gradient_checkpointing
    randomize_lora_b(model)  # with B = 0 the gradient of A is exactly zero by construction
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(n.count("lora_") == 1 for n in grads)  # only adapters train
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_sft_trainer_keeps_the_qlora_adapter_in_the_compute_dtype(tiny_dir_64):
    """TRL's SFTTrainer casts a 4-bit model's adapter to bf16; on CPU (fp32 compute) that rounds
    away most AdamW updates. After build_sft_trainer the adapter is the one PEFT made, in fp32."""
    import datasets

    from techniques.qlora import apply_qlora, load_4bit_model
    from techniques.sft import build_sft_trainer
    from tests.tiny_model import make_tiny_tokenizer

    s = settings_for(tiny_dir_64, "--load_in_4bit", "true", "--output_dir", str(tiny_dir_64 / "run"))
    model = apply_qlora(load_4bit_model(s, str(tiny_dir_64)), s)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = datasets.Dataset.from_dict({"input_ids": [[1, 5, 9, 13]], "labels": [[-100, 5, 9, 13]]})
    trainer = build_sft_trainer(model, make_tiny_tokenizer(), datasets.DatasetDict(train=rows), s)
    after = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys() and len(after) == 2 * 7 * 2  # A and B of 7 projections x 2 layers
    for name, param in after.items():
        assert param.dtype == torch.float32, name
        assert torch.equal(param, before[name]), name


def test_qlora_gradients_equal_fp32_lora_on_dequantized_weights_even_after_eval(tiny_dir_64):
    """QLoRA's gradients are those of LoRA on dequant(Q(W)); an eval pass first must not change that.

    bitsandbytes' CPU eval path repacks weights for a kernel with no backward; without the fix in
    `load_4bit_model` the gradients below lose the path through the 4-bit layers after `eval()`.
    """
    from techniques.qlora import apply_qlora, dequantized_state, load_4bit_model

    s = settings_for(tiny_dir_64, "--load_in_4bit", "true")
    qlora = apply_qlora(load_4bit_model(s, str(tiny_dir_64)), s)
    randomize_lora_b(qlora)
    reference = load_model(s, path=str(tiny_dir_64), dtype=torch.float32)
    weights = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
               for k, v in dequantized_state(qlora).items()}
    assert reference.load_state_dict(weights, strict=False).unexpected_keys == []
    reference = apply_lora(reference, s)
    reference.load_state_dict({k: v for k, v in qlora.state_dict().items() if "lora_" in k}, strict=False)

    qlora.eval()
    logits(qlora)  # an eval forward, as trainer.evaluate() does before training
    for model in (qlora, reference):
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
    reference_grads = dict(reference.named_parameters())
    for name, param in qlora.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, reference_grads[name].grad, atol=1e-5, rtol=1e-4)


def test_qlora_merge_is_dequantized_weight_plus_scaled_delta(tiny_dir_64, tmp_path):
    from techniques.qlora import apply_qlora, dequantized_state, load_4bit_model, merge_and_save_qlora

    s = settings_for(tiny_dir_64, "--load_in_4bit", "true", "--lora_r", "4", "--lora_alpha", "8")
    model = apply_qlora(load_4bit_model(s, str(tiny_dir_64)), s)
    randomize_lora_b(model)
    model.train()  # train mode: bitsandbytes' CPU eval path runs in bf16, training in the compute dtype
    live = logits(model)
    deq = dequantized_state(model)
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            deltas[name.removeprefix("base_model.model.") + ".weight"] = (8 / 4) * (b @ a).detach()
            deq_key = name + ".base_layer.weight"
            deltas[name.removeprefix("base_model.model.") + ".weight"] += deq[deq_key]

    merge_and_save_qlora(model, tmp_path / "merged", s)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    state = merged.state_dict()
    assert len(deltas) == 14  # 7 projections x 2 layers
    for key, expected in deltas.items():
        torch.testing.assert_close(state[key], expected, atol=1e-6, rtol=0)
    assert (logits(merged) - live).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- rsLoRA, DoRA, warmup given as a fraction


def first_q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def perturb_dora_magnitudes(model, seed=1):
    """DoRA's magnitude m starts at the column norms of W; move it so its role in the merge is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=gen))


def test_rslora_scale_is_alpha_over_sqrt_r_after_save_load_and_merge(tiny_dir, tmp_path):
    s = settings_for(tiny_dir, "--use_rslora", "true", "--lora_r", "4", "--lora_alpha", "8")
    model = apply_lora(load_model(s, path=str(tiny_dir)), s)
    assert first_q_proj(model).scaling == {"default": 4.0}  # 8 / sqrt(4); plain LoRA would be 8 / 4 = 2
    randomize_lora_b(model)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_lora(load_model(s, path=str(tiny_dir)), tmp_path / "adapter")
    assert first_q_proj(reloaded).scaling == {"default": 4.0}
    assert torch.equal(logits(reloaded), expected)

    q = first_q_proj(model)
    w = q.base_layer.weight.detach().clone()
    delta = (q.lora_B["default"].weight @ q.lora_A["default"].weight).detach()
    merge_and_save_lora(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    merged_q = merged.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(merged_q, w + 4.0 * delta, atol=1e-6, rtol=0)
    assert (merged_q - (w + 2.0 * delta)).abs().max() > 1e-3  # the alpha / r scale would be told apart
    assert (logits(merged) - expected).abs().max().item() <= 1e-4


def test_dora_starts_at_the_base_round_trips_and_merges_by_its_formula(tiny_dir, tmp_path):
    """DoRA (Liu et al. 2024, eq. 5): W' = m * (W + s B A) / ||W + s B A||, the norm per output row
    (PEFT's layout of nn.Linear weights, [out, in]); m starts at ||W|| and B at 0, so step 0 == base."""
    s = settings_for(tiny_dir, "--use_dora", "true", "--lora_r", "4", "--lora_alpha", "8")
    base_logits = logits(load_model(s, path=str(tiny_dir)))
    model = apply_lora(load_model(s, path=str(tiny_dir)), s)
    torch.testing.assert_close(logits(model), base_logits, atol=1e-5, rtol=0)
    q = first_q_proj(model)
    torch.testing.assert_close(q.lora_magnitude_vector["default"].weight, q.base_layer.weight.norm(dim=1))

    randomize_lora_b(model)
    perturb_dora_magnitudes(model)
    expected = logits(model)
    assert (expected - base_logits).abs().max() > 1e-2
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_lora(load_model(s, path=str(tiny_dir)), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-6, rtol=0)

    w = q.base_layer.weight.detach().clone()
    updated = w + 2.0 * (q.lora_B["default"].weight @ q.lora_A["default"].weight).detach()  # s = 8 / 4
    magnitude = q.lora_magnitude_vector["default"].weight.detach()
    formula = (magnitude / updated.norm(dim=1)).unsqueeze(1) * updated
    diff = merge_and_save_lora(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, formula, atol=1e-6, rtol=0)
    assert diff <= 1e-4 and (logits(merged) - expected).abs().max().item() <= 1e-4


def test_warmup_steps_below_1_is_a_fraction_of_all_steps(tiny_dir, tmp_path):
    """Optimizer step k (from 1) runs at lr * schedule(k - 1) with ceil(fraction * max_steps) warmup
    steps: 0.3 of 8 steps is 3 (2.4 rounded up, not down)."""
    from datasets import Dataset, DatasetDict

    from models import load_tokenizer
    from techniques.sft import build_sft_trainer
    from tests.test_full_finetune import Recorder, schedule
    from tests.tiny import one_torch_thread

    fraction, warmup, total = 0.3, 3, 8
    s = settings_for(tiny_dir, "--warmup_steps", str(fraction), "--max_steps", str(total), "--learning_rate", "1e-3",
                     "--lr_scheduler_type", "linear", "--per_device_train_batch_size", "1", "--output_dir",
                     str(tmp_path / "run"), "--logging_steps", "100", "--eval_split_size", "0")
    examples = [[1, 5 + i, 9, 13, 2] for i in range(4)]
    data = DatasetDict({"train": Dataset.from_dict(
        {"input_ids": examples, "labels": examples, "attention_mask": [[1] * 5 for _ in examples]})})
    trainer = build_sft_trainer(apply_lora(load_model(s, path=str(tiny_dir)), s), load_tokenizer(s, tiny_dir), data, s)
    recorder = Recorder()
    trainer.add_callback(recorder)
    with one_torch_thread():
        trainer.train()
    expected = [1e-3 * schedule("linear", k - 1, warmup, total) for k in range(1, total + 1)]
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert expected[warmup] == 1e-3 and expected[warmup - 1] < 1e-3  # the peak is reached at step warmup + 1


class CountOps:
    """Counts the aten ops a block of code runs (a TorchDispatchMode), by overload packet name."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_under_autocast_the_adapter_input_is_not_cast_to_fp32_and_back(tiny_dir):
    """bf16 frozen weights, fp32 adapters (as a bf16 run loads them): PEFT casts each adapted
    layer's bf16 input to fp32 and autocast casts it straight back. Skipping that cast under
    autocast gives bit-equal logits and two copies fewer per adapted layer; outside autocast the
    cast still happens (an fp32 adapter cannot take a bf16 input)."""
    from peft import get_peft_model

    from techniques.lora import lora_config, skip_input_casts_under_autocast

    s = settings_for(tiny_dir)
    hooked = apply_lora(load_model(s, path=str(tiny_dir), dtype=torch.bfloat16), s)
    plain = get_peft_model(load_model(s, path=str(tiny_dir), dtype=torch.bfloat16), lora_config(s))
    randomize_lora_b(hooked)
    plain.load_state_dict(hooked.state_dict())
    adapters = {p.dtype for n, p in hooked.named_parameters() if "lora_" in n}
    assert adapters == {torch.float32}
    layers = skip_input_casts_under_autocast(torch.nn.Sequential())  # nothing to hook in an empty module
    assert layers == 0
    n_layers = sum(1 for n, _ in hooked.named_modules() if n.endswith(".lora_A"))
    assert n_layers == 2 * 7  # 2 tiny layers x 7 projections
    counts = {}
    for name, model in (("hooked", hooked), ("plain", plain)):
        with torch.autocast("cpu", dtype=torch.bfloat16), CountOps() as ops:
            out = logits(model)
        counts[name] = (out, ops.counts.get("_to_copy", 0))
    torch.testing.assert_close(counts["hooked"][0], counts["plain"][0], rtol=0, atol=0)
    assert counts["plain"][1] - counts["hooked"][1] == 2 * n_layers
    torch.testing.assert_close(logits(hooked), logits(plain), rtol=0, atol=0)  # no autocast: PEFT's cast runs


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU run")
def test_bf16_cpu_lora_run_keeps_fp32_adapters_and_the_fp32_losses(tiny_dir, tmp_path, native_bf16):
    """MIXED_PRECISION=bf16 on a CPU with native bf16: the trainer autocasts, the frozen weights
    load in bf16 (models.frozen_weight_dtype), the adapters and their updates stay fp32, and the
    per-step losses track an fp32 run of the same steps within bf16 rounding."""
    from datasets import Dataset, DatasetDict

    from models import frozen_weight_dtype, load_tokenizer
    from techniques.sft import build_sft_trainer
    from tests.tiny import one_torch_thread

    examples = [[1, 5 + i, 9, 13, 17 + i, 21, 2] for i in range(8)]
    data = DatasetDict({"train": Dataset.from_dict(
        {"input_ids": examples, "labels": examples, "attention_mask": [[1] * 7 for _ in examples]})})
    runs = {}
    for precision in ("bf16", "no"):
        s = settings_for(tiny_dir, "--mixed_precision", precision, "--max_steps", "4", "--learning_rate", "1e-2",
                         "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / precision),
                         "--logging_steps", "1", "--eval_split_size", "0", "--warmup_steps", "0")
        model = apply_lora(load_model(s, path=str(tiny_dir), dtype=frozen_weight_dtype(s)), s)
        trainer = build_sft_trainer(model, load_tokenizer(s, tiny_dir), data, s)
        with one_torch_thread():
            trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        runs[precision] = (trainer.args.bf16, losses, dtypes)
    (bf16_on, bf16_losses, bf16_dtypes), (fp32_on, fp32_losses, fp32_dtypes) = runs["bf16"], runs["no"]
    assert bf16_on and not fp32_on
    assert {d for n, d in bf16_dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in bf16_dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert set(fp32_dtypes.values()) == {torch.float32}
    assert len(bf16_losses) == len(fp32_losses) == 4
    assert bf16_losses == pytest.approx(fp32_losses, rel=2e-2)
    assert bf16_losses[-1] < bf16_losses[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU run")
def test_bf16_cpu_qlora_keeps_a_bf16_residual_stream_and_fp32_adapters(tiny_dir_64, native_bf16):
    """MIXED_PRECISION=bf16 on a CPU with native bf16: the 4-bit layers compute in bf16, the frozen
    norms and embeddings that PEFT's `prepare_model_for_kbit_training` upcast are bf16 again (an fp32
    residual stream doubled QLoRA's activation memory), and the adapters stay fp32 through TRL.
    In fp32 (mixed_precision=no) nothing changes: fp32 compute, PEFT's fp32 norms."""
    import datasets

    from techniques.qlora import apply_qlora, compute_dtype, load_4bit_model
    from techniques.sft import build_sft_trainer
    from tests.tiny_model import make_tiny_tokenizer

    rows = datasets.Dataset.from_dict({"input_ids": [[1, 5, 9, 13]], "labels": [[-100, 5, 9, 13]]})
    residual = {}
    for precision in ("bf16", "no"):
        s = settings_for(tiny_dir_64, "--load_in_4bit", "true", "--mixed_precision", precision,
                         "--output_dir", str(tiny_dir_64 / precision))
        model = apply_qlora(load_4bit_model(s, str(tiny_dir_64)), s)
        trainer = build_sft_trainer(model, make_tiny_tokenizer(), datasets.DatasetDict(train=rows), s)
        params = dict(trainer.model.named_parameters())
        adapters = {p.dtype for n, p in params.items() if "lora_" in n}
        frozen = {p.dtype for n, p in params.items() if "lora_" not in n and type(p).__name__ != "Params4bit"}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), torch.no_grad():
            hidden = trainer.model(input_ids=IDS, output_hidden_states=True).hidden_states
        residual[precision] = (compute_dtype(s), adapters, frozen, {h.dtype for h in hidden[1:]})
    assert residual["bf16"] == (torch.bfloat16, {torch.float32}, {torch.bfloat16}, {torch.bfloat16})
    assert residual["no"] == (torch.float32, {torch.float32}, {torch.float32}, {torch.float32})
