"""After training: merged folders (stop ids, tied embeddings, added tokens, QLoRA variants), adapter
loading on a fresh base, and the merge CLI, on tiny random Llamas."""

import json
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from config import save_settings
from models import load_model
from techniques.lora import (
    ADDED_ROWS_FILE,
    apply_lora,
    load_lora,
    merge_and_save_lora,
    resize_token_embeddings,
    save_lora,
)
from tests.test_lora import logits, randomize_lora_b, settings_for, tiny_dir_64  # noqa: F401 (fixture)
from tests.tiny_model import make_tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import merge_adapter  # noqa: E402

NEW_TOKENS = ["<|tool|>", "<|observation|>"]


def randomize_adapter(model, seed=0):
    """Random LoRA A and B (embedding LoRA starts with A = 0) and perturbed modules_to_save copies."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def make_adapter_dir(tmp_path, model_dir, template="chatml", *flags, stop_ids=None, name="adapter"):
    """An adapter folder as examples/finetune_llm_lora.py leaves it: adapter, tokenizer, generation
    config with the stop ids, run_settings.json. Returns (folder, the live adapter model)."""
    s = settings_for(model_dir, "--prompt_template", template, *flags)
    model = apply_lora(load_model(s, path=str(model_dir)), s)
    randomize_lora_b(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    folder = save_lora(model, tmp_path / name, tokenizer)
    GenerationConfig(eos_token_id=stop_ids or [tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    save_settings(s, folder / "run_settings.json")
    return folder, model


# ---------------------------------------------------------------- generation config: every stop id


def test_merged_generation_config_has_every_stop_id_of_the_template(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path)
    s = settings_for(model_dir)
    model = apply_lora(load_model(s, path=str(model_dir)), s)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.eos_token = "<|endoftext|>"  # id 0: chatml now stops on eos (0) and <|im_end|> (2)
    merge_and_save_lora(model, tmp_path / "merged", tokenizer=tokenizer, template="chatml", stop_ids=[7])
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == [0, 2, 7]
    saved = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert saved.chat_template == tokenizer.chat_template and saved.eos_token == "<|endoftext|>"


def test_merge_reads_stop_ids_template_and_tokenizer_from_the_adapter_folder(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path)
    adapter_dir, _ = make_adapter_dir(tmp_path, model_dir, "alpaca", stop_ids=[2, 0])
    model = load_lora(load_model(settings_for(model_dir), path=str(model_dir)), adapter_dir)
    assert model.get_base_model().generation_config.eos_token_id == [2, 0]  # load_lora adopts them
    merge_and_save_lora(model, tmp_path / "merged", adapter_dir=adapter_dir)
    merged = tmp_path / "merged"
    assert GenerationConfig.from_pretrained(merged).eos_token_id == [2, 0]
    assert json.loads((merged / "run_settings.json").read_text())["prompt_template"] == "alpaca"
    assert (merged / "tokenizer_config.json").is_file() and (merged / "chat_template.jinja").is_file()


# ---------------------------------------------------------------- tied embeddings


@pytest.mark.parametrize("case", ["lora_lm_head", "lora_embed_tokens", "save_lm_head", "save_embed_tokens", "neither"])
def test_tied_embeddings_merge_to_the_adapter_models_logits(tmp_path, case):
    model_dir = make_tiny_model_dir(tmp_path, tie_word_embeddings=True)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    original_embed = base.model.embed_tokens.weight.detach().clone()
    config = {
        "lora_lm_head": LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
        "lora_embed_tokens": LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]),
        "save_lm_head": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "save_embed_tokens": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
        "neither": LoraConfig(r=4, target_modules=["q_proj"]),
    }[case]
    model = get_peft_model(base, config)
    randomize_adapter(model)
    expected = logits(model)

    diff = merge_and_save_lora(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert diff <= 1e-4 and (logits(merged) - expected).abs().max().item() <= 1e-4
    saved_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        saved_keys = set(f.keys())
    if case == "neither":  # still one matrix, still tied
        assert saved_config["tie_word_embeddings"] is True and "lm_head.weight" not in saved_keys
    else:  # the matrices differ: untied, both saved, so vLLM / llama.cpp read the right head
        assert saved_config["tie_word_embeddings"] is False and "lm_head.weight" in saved_keys
    if case in ("lora_lm_head", "save_lm_head", "neither"):
        assert torch.equal(merged.model.embed_tokens.weight, original_embed)  # only the head was adapted


# ---------------------------------------------------------------- added tokens


def add_tokens_and_lora(model_dir, tokenizer, targets=("q_proj", "v_proj")):
    s = settings_for(model_dir, "--lora_target_modules", ",".join(targets))
    model = load_model(s, path=str(model_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": NEW_TOKENS})
    rows_before = resize_token_embeddings(model, tokenizer)
    model = apply_lora(model, s)
    randomize_lora_b(model)
    return model, rows_before


def new_token_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(NEW_TOKENS)
    return torch.tensor([[1, ids[0], 9, ids[1], 17, 21, ids[0], 29]])


@pytest.mark.parametrize("tie", [True, False])
def test_added_token_rows_are_restored_exactly_on_a_fresh_base(tmp_path, tie):
    model_dir = make_tiny_model_dir(tmp_path, tie_word_embeddings=tie)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, rows_before = add_tokens_and_lora(model_dir, tokenizer)
    assert model.get_input_embeddings().num_embeddings == rows_before + 2
    ids = new_token_ids(tokenizer)
    expected = logits(model, ids)
    save_lora(model, tmp_path / "adapter", tokenizer)
    with safe_open(str(tmp_path / "adapter" / ADDED_ROWS_FILE), "pt") as f:
        assert f.get_tensor("embed_tokens").shape[0] == 2 and ("lm_head" in f.keys()) == (not tie)

    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    reloaded = load_lora(fresh, tmp_path / "adapter")
    assert reloaded.get_input_embeddings().num_embeddings == rows_before + 2
    assert torch.equal(logits(reloaded, ids), expected)
    trained_head = model.get_base_model().lm_head.weight
    assert torch.equal(reloaded.get_base_model().lm_head.weight, trained_head)


def test_adapter_saved_by_the_trainer_after_resizing_loads_on_a_fresh_base(tmp_path):
    """`trainer.save_model` saves whole embedding matrices (PEFT's "auto"); load_lora resizes first."""
    model_dir = make_tiny_model_dir(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, _ = add_tokens_and_lora(model_dir, tokenizer)
    ids = new_token_ids(tokenizer)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    reloaded = load_lora(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, ids), expected)


def test_padded_base_is_never_shrunk_and_new_tokens_use_its_padding_rows(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model_dir(tmp_path, name="tok"))
    padded_rows = len(tokenizer) + 8
    model_dir = make_tiny_model_dir(tmp_path, vocab_size=padded_rows)
    model, rows_before = add_tokens_and_lora(model_dir, tokenizer)
    assert rows_before == padded_rows and model.get_input_embeddings().num_embeddings == padded_rows
    ids = new_token_ids(tokenizer)
    expected = logits(model, ids)
    save_lora(model, tmp_path / "adapter", tokenizer)
    assert not (tmp_path / "adapter" / ADDED_ROWS_FILE).exists()  # no row a fresh base lacks
    reloaded = load_lora(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
    assert reloaded.get_input_embeddings().num_embeddings == padded_rows  # not len(tokenizer)
    assert torch.equal(logits(reloaded, ids), expected)


def test_merge_after_adding_tokens_keeps_rows_and_tokenizer(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, tie_word_embeddings=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, rows_before = add_tokens_and_lora(model_dir, tokenizer)
    save_lora(model, tmp_path / "adapter", tokenizer)
    ids = new_token_ids(tokenizer)
    expected = logits(model, ids)
    reloaded = load_lora(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
    merge_and_save_lora(reloaded, tmp_path / "merged", adapter_dir=tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.vocab_size == rows_before + 2
    assert (logits(merged, ids) - expected).abs().max().item() <= 1e-4
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").convert_tokens_to_ids(NEW_TOKENS) == ids[0, [1, 3]].tolist()


# ---------------------------------------------------------------- QLoRA: merge onto the original weights


def test_qlora_merge_onto_original_weights_is_w_plus_scaled_delta(tiny_dir_64, tmp_path):  # noqa: F811
    from techniques.qlora import apply_qlora, load_4bit_model, merge_and_save_qlora

    s = settings_for(tiny_dir_64, "--load_in_4bit", "true", "--lora_r", "4", "--lora_alpha", "8")
    model = apply_qlora(load_4bit_model(s, str(tiny_dir_64)), s)
    randomize_lora_b(model)
    live = logits(model)
    original = load_model(s, path=str(tiny_dir_64), dtype=torch.float32).state_dict()
    expected = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            key = name.removeprefix("base_model.model.") + ".weight"
            expected[key] = original[key] + (8 / 4) * (b @ a).detach()

    merge_and_save_qlora(model, tmp_path / "merged", s, onto="original")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    state = merged.state_dict()
    for key, weight in expected.items():
        torch.testing.assert_close(state[key], weight, atol=1e-6, rtol=0)
    assert (logits(merged) - live).abs().max().item() > 1e-3  # it is not the model QLoRA trained
    with pytest.raises(ValueError, match="onto"):
        merge_and_save_qlora(model, tmp_path / "other", s, onto="nf4")


def test_qlora_dora_merge_reproduces_the_live_4bit_model(tiny_dir_64, tmp_path):  # noqa: F811
    """QLoRA + DoRA: the merged folder is m * (dequant(Q(W)) + s B A) / ||...|| per output row and gives
    the live 4-bit model's logits (train mode, where bitsandbytes computes in the compute dtype)."""
    from techniques.qlora import apply_qlora, dequantized_state, load_4bit_model, merge_and_save_qlora
    from tests.test_lora import perturb_dora_magnitudes

    s = settings_for(tiny_dir_64, "--load_in_4bit", "true", "--use_dora", "true", "--lora_r", "4", "--lora_alpha", "8")
    base_live = logits(load_4bit_model(s, str(tiny_dir_64)).train())
    model = apply_qlora(load_4bit_model(s, str(tiny_dir_64)), s)
    model.train()
    torch.testing.assert_close(logits(model), base_live, atol=1e-4, rtol=0)  # step 0 == the 4-bit base
    randomize_lora_b(model)
    perturb_dora_magnitudes(model)
    live = logits(model)
    assert (live - base_live).abs().max() > 1e-2
    deq = dequantized_state(model)
    expected = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            updated = deq[name + ".base_layer.weight"] + 2.0 * (b @ a).detach()
            magnitude = module.lora_magnitude_vector["default"].weight.detach()
            expected[name.removeprefix("base_model.model.") + ".weight"] = (magnitude / updated.norm(dim=1))[:, None] * updated

    diff = merge_and_save_qlora(model, tmp_path / "merged", s)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    state = merged.state_dict()
    assert len(expected) == 14  # 7 projections x 2 layers
    for key, weight in expected.items():
        torch.testing.assert_close(state[key], weight, atol=1e-5, rtol=0, msg=key)
    assert diff <= 1e-4 and (logits(merged) - live).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- the CLI


def test_merge_adapter_cli_reads_base_and_template_from_the_adapter_folder(tmp_path, capsys):
    model_dir = make_tiny_model_dir(tmp_path, tie_word_embeddings=False)
    adapter_dir, live = make_adapter_dir(tmp_path, model_dir, "alpaca")
    from runs.card import model_card
    from techniques.lora import adapter_settings

    model_card(adapter_settings(adapter_dir), "sft", {"eval_loss": (1.0, 0.5)}).save(adapter_dir / "README.md")
    expected = logits(live)
    diff = merge_adapter.main(["--adapter_dir", str(adapter_dir), "--output_dir", str(tmp_path / "merged")])
    assert "max |logit diff| vs the adapter model" in capsys.readouterr().out and diff <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged) - expected).abs().max().item() <= 1e-4
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == [2]
    assert json.loads((tmp_path / "merged" / "run_settings.json").read_text())["prompt_template"] == "alpaca"
    card = ModelCard.load(tmp_path / "merged" / "README.md", ignore_metadata_errors=False)  # the card came along
    assert card.data.library_name == "transformers" and "merged" in card.data.tags
    assert "**Merged model**" in card.text and "| eval loss | 1.0000 | 0.5000 |" in card.text
    with pytest.raises(FileExistsError, match="not empty"):
        merge_adapter.main(["--adapter_dir", str(adapter_dir), "--output_dir", str(tmp_path / "merged")])


def test_merge_adapter_cli_merges_qlora_adapters_exactly(tiny_dir_64, tmp_path, caplog):  # noqa: F811
    from techniques.qlora import apply_qlora, load_4bit_model

    s = settings_for(tiny_dir_64, "--load_in_4bit", "true")
    model = apply_qlora(load_4bit_model(s, str(tiny_dir_64)), s)
    randomize_lora_b(model)
    live = logits(model.eval())
    model.save_pretrained(tmp_path / "adapter")
    save_settings(s, tmp_path / "adapter" / "run_settings.json")
    caplog.set_level("INFO")
    merge_adapter.main(["--adapter_dir", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "merged")])
    assert "dequant(Q(W))" in caplog.text
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert (logits(merged) - live).abs().max().item() <= 1e-4


def test_adapter_settings_fall_back_to_adapter_config(tmp_path):
    from techniques.lora import adapter_settings

    model_dir = make_tiny_model_dir(tmp_path)
    adapter_dir, _ = make_adapter_dir(tmp_path, model_dir, "phi3")
    assert adapter_settings(adapter_dir).prompt_template == "phi3"
    (adapter_dir / "run_settings.json").unlink()
    assert adapter_settings(adapter_dir).base_model_name == str(model_dir)
    assert adapter_settings(adapter_dir, base_model_name="other").base_model_name == "other"


def test_a_saved_run_never_turns_on_remote_code_or_pickles(tmp_path, monkeypatch):
    """run_settings.json is data from a folder: its trust_remote_code / allow_pickle_weights (here
    both true, as a tampered or careless folder would have them) are not read back; this run's own
    environment decides. Without the filter chat and merge ran the base folder's Python code."""
    from techniques.lora import adapter_settings

    model_dir = make_tiny_model_dir(tmp_path)
    adapter_dir, _ = make_adapter_dir(tmp_path, model_dir, "chatml")
    saved = json.loads((adapter_dir / "run_settings.json").read_text())
    saved.update(trust_remote_code=True, allow_pickle_weights=True, a_future_setting=1)
    (adapter_dir / "run_settings.json").write_text(json.dumps(saved))
    for name in ("TRUST_REMOTE_CODE", "ALLOW_PICKLE_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    settings = adapter_settings(adapter_dir)
    assert (settings.trust_remote_code, settings.allow_pickle_weights, settings.prompt_template) == (False, False, "chatml")
    monkeypatch.setenv("TRUST_REMOTE_CODE", "true")  # the user's own choice for this run
    assert adapter_settings(adapter_dir).trust_remote_code is True
