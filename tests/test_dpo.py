"""DPO on tiny random models: step-0 identity per policy kind, the prompt/answer boundary, truncation,
every loss against its paper's formula, preference record formats, and the example end to end."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tests.tiny_model as tiny_model
from tests.test_outputs import check_run_outputs
from config import Settings, get_settings
from data.errors import DatasetError
from models import load_model, load_tokenizer
from techniques.dpo import (
    build_dpo_trainer,
    build_preference_dataset,
    encode_pair,
    load_policy,
    pair_log_probs,
    to_preference,
    truncate_pair,
)
from techniques.lora import apply_lora
from tests.tiny import make_tokenizer
from tests.tiny_model import make_tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import dpo as dpo_example  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
LN2 = math.log(2)
# Answers that start differently after a prompt ending in "A: ": joint tokenization would merge
# the space into " 46" but into " $" for the other answer.
PAIRS = [{"prompt": f"What is {n} times 2?", "chosen": str(2 * n), "rejected": f"${2 * n}"} for n in range(17, 29)]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    with pytest.MonkeyPatch.context() as mp:
        # Attention dropout (and lora_dropout below) would break policy == reference if left on.
        mp.setitem(tiny_model.TINY_CONFIG, "attention_dropout", 0.3)
        tiny = make_tiny_model_dir(root)
        mp.setitem(tiny_model.TINY_CONFIG, "hidden_size", 64)  # bitsandbytes' CPU 4-bit kernel: 64-wide inputs
        mp.setitem(tiny_model.TINY_CONFIG, "intermediate_size", 128)
        tiny_64 = make_tiny_model_dir(root, name="tiny-64")
    return {"root": root, "data": data, "tiny": tiny, "tiny_64": tiny_64}


def settings_for(model_dir, data, *flags):
    return get_settings([
        "--base_model_name", str(model_dir), "--dpo_dataset_path", str(data), "--prompt_template", "chatml",
        "--output_dir", str(Path(data).parent / "out"), "--eval_split_size", "0", "--lora_dropout", "0.3",
        "--per_device_train_batch_size", "4", "--mixed_precision", "no", "--learning_rate", "1e-2", *flags,
    ], env_file=None)


def trainer_for(settings, model_dir, **overrides):
    tokenizer = load_tokenizer(settings, str(model_dir))
    splits = build_preference_dataset(settings, tokenizer)
    model = load_policy(settings, str(model_dir))
    return build_dpo_trainer(model, tokenizer, splits["train"], splits.get("eval"), settings, **overrides)


def first_batch(trainer):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    return {k: v.to(trainer.args.device) for k, v in batch.items()}


def train_loss_and_rewards(trainer, batch):
    trainer.model.train()  # the training pass, where dropout would act
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics["rewards/chosen"], metrics["rewards/rejected"], metrics["rewards/margins"]


def make_sft_adapter(model_dir, out_dir, settings):
    """A LoRA adapter whose B matrices are non-zero, so the SFT model differs from the base."""
    model = apply_lora(load_model(settings, str(model_dir)), settings)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- step-0 identity


@pytest.mark.parametrize(
    "kind", ["lora", "lora_on_sft_adapter", "qlora", "qlora_on_sft_adapter", "full_frozen_copy", "full_precomputed"])
def test_step0_rewards_are_zero_and_sigmoid_loss_is_ln2(files, kind):
    """Policy == reference before any step, in the training pass of a model with attention_dropout=0.3
    and lora_dropout=0.3 (both must be off)."""
    model_dir, flags = files["tiny"], []
    if kind == "lora_on_sft_adapter":
        base = settings_for(model_dir, files["data"])
        flags = ["--sft_adapter_dir", str(make_sft_adapter(model_dir, files["root"] / "sft-0", base))]
    elif kind.startswith("qlora"):
        model_dir, flags = files["tiny_64"], ["--load_in_4bit", "true"]
        if kind == "qlora_on_sft_adapter":
            base = settings_for(model_dir, files["data"])
            flags += ["--sft_adapter_dir", str(make_sft_adapter(model_dir, files["root"] / "sft-64", base))]
    elif kind.startswith("full"):
        flags = ["--dpo_policy", "full", "--precompute_ref_log_probs", str(kind == "full_precomputed").lower()]
    trainer = trainer_for(settings_for(model_dir, files["data"], *flags), model_dir)
    loss, chosen, rejected, margin = train_loss_and_rewards(trainer, first_batch(trainer))
    assert loss == pytest.approx(LN2, abs=1e-6)
    assert (chosen, rejected, margin) == pytest.approx((0.0, 0.0, 0.0), abs=1e-6)


def test_lora_on_sft_adapter_uses_the_frozen_sft_adapter_as_reference(files):
    settings = settings_for(files["tiny"], files["data"])
    sft_dir = make_sft_adapter(files["tiny"], files["root"] / "sft-1", settings)
    settings = settings_for(files["tiny"], files["data"], "--sft_adapter_dir", str(sft_dir), "--warmup_steps", "0")
    trainer = trainer_for(settings, files["tiny"])
    model, batch = trainer.model, first_batch(trainer)

    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    policy_chosen, policy_rejected = pair_log_probs(model, trainer.train_dataset.select(range(4)), 2)
    with model.disable_adapter():
        base_chosen, base_rejected = pair_log_probs(model, trainer.train_dataset.select(range(4)), 2)
    assert torch.allclose(ref_chosen.cpu(), policy_chosen, atol=1e-5)
    assert torch.allclose(ref_rejected.cpu(), policy_rejected, atol=1e-5)
    assert (ref_chosen.cpu() - base_chosen).abs().min() > 1e-2  # the base is not the reference

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    trainer.args.max_steps = 1
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


# ---------------------------------------------------------------- prompt / answer boundary


QA_TEMPLATE = (  # a chat template whose generation prompt ends with a space, as plain-text prompts do
    "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\nA: "
    "{% else %}{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("template", ["tokenizer", "chatml", "alpaca", "phi3", "llama3"])
def test_chosen_and_rejected_share_prompt_ids_and_the_mask_is_the_answer_plus_turn_end(template):
    family = {"phi3": "phi3", "llama3": "llama3"}.get(template, "chatml")
    tokenizer = make_tokenizer(family)
    tokenizer.chat_template = QA_TEMPLATE
    prompt = [{"role": "user", "content": "What is 23 times 2?"}]
    pair = encode_pair(prompt, "46", "$46", template, tokenizer)
    turn_end = {"chatml": "<|im_end|>", "phi3": "<|end|>", "llama3": "<|eot_id|>"}.get(template, tokenizer.eos_token)
    assert tokenizer.decode(pair["chosen_ids"]) == "46" + turn_end
    assert tokenizer.decode(pair["rejected_ids"]) == "$46" + turn_end
    if template == "tokenizer":
        assert tokenizer.decode(pair["prompt_ids"]).endswith("A: ")

    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=0)([pair])
    for row, mask, answer in zip(batch["input_ids"], batch["completion_mask"], ("46", "$46"), strict=True):
        n = len(pair["prompt_ids"])
        assert row[:n].tolist() == pair["prompt_ids"]  # identical prompt ids in both rows
        assert tokenizer.decode(row[mask.bool()]) == answer + turn_end
        assert mask[:n].sum() == 0


def test_joint_tokenization_would_move_the_boundary():
    """Why pairs are tokenized by construction: tokenizing prompt + answer in one piece merges the
    prompt's final space into the answer, differently for "46" and "$46"."""
    tokenizer = make_tokenizer("chatml")
    prompt_ids = tokenizer("Q: 23 times 2?\nA: ")["input_ids"]
    joint_chosen = tokenizer("Q: 23 times 2?\nA: 46")["input_ids"]
    joint_rejected = tokenizer("Q: 23 times 2?\nA: $46")["input_ids"]
    assert joint_chosen[: len(prompt_ids)] != prompt_ids or joint_rejected[: len(prompt_ids)] != prompt_ids


def test_log_probs_equal_a_hand_computed_sum_over_the_answer_tokens(files):
    settings = settings_for(files["tiny"], files["data"], "--dpo_policy", "full")
    trainer = trainer_for(settings, files["tiny"])
    tokenizer = trainer.processing_class
    batch = first_batch(trainer)
    got_chosen, got_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    model = trainer.model.eval()
    for i, record in enumerate(PAIRS[:4]):
        prompt = [{"role": "user", "content": record["prompt"]}]
        pair = encode_pair(prompt, record["chosen"], record["rejected"], "chatml", tokenizer)
        for answer, got in ((record["chosen"], got_chosen[i]), (record["rejected"], got_rejected[i])):
            answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids = pair["prompt_ids"] + answer_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0]
            expected = sum(
                torch.log_softmax(logits[t - 1], dim=-1)[ids[t]].item()
                for t in range(len(pair["prompt_ids"]), len(ids))
            )
            assert got.item() == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- truncation


@pytest.mark.parametrize("head", [0, 1])
def test_truncation_grid_fits_keeps_an_answer_token_and_one_prompt(head):
    for max_length in (2, 3, 8, 16):
        for max_prompt_length in (1, 4, 12, 40):
            for n_prompt in (1, 3, 7, 15, 30):
                for n_chosen in (1, 2, 9, 20):
                    for n_rejected in (1, 5, 20):
                        pair = {"prompt_ids": list(range(100, 100 + n_prompt)), "chosen_ids": [1] * n_chosen,
                                "rejected_ids": [2] * n_rejected}
                        out, cut = truncate_pair(pair, max_length, max_prompt_length, head)
                        p = out["prompt_ids"]
                        assert len(p) + len(out["chosen_ids"]) <= max_length
                        assert len(p) + len(out["rejected_ids"]) <= max_length
                        assert out["chosen_ids"] and out["rejected_ids"]
                        assert out["chosen_ids"] == pair["chosen_ids"][: len(out["chosen_ids"])]
                        fits = n_prompt + max(n_chosen, n_rejected) <= max_length
                        if fits or n_prompt <= min(max_prompt_length, max_length - 1):
                            assert p == pair["prompt_ids"]
                        else:  # a left cut: the prompt's end survives, and its BOS (head=1) when p > 1
                            assert p[-1] == pair["prompt_ids"][-1] and len(p) == min(max_prompt_length, max_length - 1)
                            assert head == 0 or len(p) == 1 or p[0] == 100
                        assert cut == (out != pair)


def test_truncated_pairs_train_with_a_finite_loss(files):
    long = [{"prompt": "Tell me about the lazy dog. " * 12, "chosen": "The quick brown fox. " * 9, "rejected": "No."}]
    data = files["root"] / "long.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in long * 4))
    settings = settings_for(files["tiny"], data, "--dpo_policy", "full", "--max_length", "48", "--max_prompt_length", "20")
    trainer = trainer_for(settings, files["tiny"])
    row = trainer.train_dataset[0]
    assert len(row["prompt_ids"]) == 20 and len(row["prompt_ids"]) + len(row["chosen_ids"]) == 48
    assert len(row["rejected_ids"]) == len(trainer.processing_class("No.<|im_end|>")["input_ids"])
    trainer.args.max_steps = 2
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


# ---------------------------------------------------------------- losses against their papers


def _hand_loss(case, pc, pr, rc, rr, lc, lr, beta, eps, chosen_nll):
    """Per-pair loss of `case` from its paper (Δc, Δr: policy minus reference log-prob of each answer)."""
    dc, dr = pc - rc, pr - rr
    d = dc - dr
    ls = F.logsigmoid
    tau = 0.05

    def aot(x):
        return -ls(beta * x) * (1 - eps) - ls(-beta * x) * eps

    formulas = {
        "sigmoid": lambda: -ls(beta * d),  # Rafailov et al. 2023, eq. 7
        "cdpo": lambda: -(1 - eps) * ls(beta * d) - eps * ls(-beta * d),  # Mitchell 2023
        "hinge": lambda: torch.relu(1 - beta * d),  # SLiC-HF, Zhao et al. 2023
        "ipo": lambda: (dc / lc - dr / lr - 1 / (2 * beta)) ** 2,  # Azar et al. 2023, eq. 17 (per-token log-ratios)
        "robust": lambda: (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps),  # Chowdhury et al. 2024, eq. 10
        "exo_pair": lambda: torch.sigmoid(beta * d) * (ls(beta * d) - math.log(1 - eps))
        + torch.sigmoid(-beta * d) * (ls(-beta * d) - math.log(eps)),  # Ji et al. 2024, EXO-pref eq. 16
        "nca_pair": lambda: -ls(beta * dc) - 0.5 * ls(-beta * dc) - 0.5 * ls(-beta * dr),  # Chen et al. 2024, NCA
        "bco_pair": lambda: -ls(beta * dc) - ls(-beta * dr),  # Jung et al. 2024, BCO with reward shift 0
        "sppo_hard": lambda: (dc - 0.5 / beta) ** 2 + (dr + 0.5 / beta) ** 2,  # Wu et al. 2024, SPPO eq. 4.7, P in {0, 1}
        "aot": lambda: aot(torch.sort(pc - pr).values - torch.sort(rc - rr).values),  # Melnyk et al. 2024
        "aot_unpaired": lambda: aot(torch.sort(dc).values - torch.sort(dr).values),
        "apo_zero": lambda: (1 - torch.sigmoid(beta * dc)) + torch.sigmoid(beta * dr),  # D'Oosterlinck et al. 2024, eq. 7
        "apo_down": lambda: torch.sigmoid(beta * dc) + (1 - torch.sigmoid(beta * d)),  # eq. 8
        "discopop": lambda: (1 - torch.sigmoid(beta * d / tau)) * -ls(beta * d)
        + torch.sigmoid(beta * d / tau) * torch.exp(-beta * d),  # Lu et al. 2024, eq. 5
        "sigmoid_norm": lambda: -ls(beta * (dc / lc - dr / lr)),
        "rpo": lambda: -ls(beta * d) + 0.7 * chosen_nll,  # Pang et al. 2024, eq. 1 with α = 0.7
    }
    return formulas[case]()


LOSS_CASES = {  # case -> flags
    "sigmoid": [], "cdpo": ["--label_smoothing", "0.2"], "hinge": [], "ipo": [], "robust": ["--label_smoothing", "0.2"],
    "exo_pair": ["--label_smoothing", "0.01"], "nca_pair": [], "bco_pair": [], "sppo_hard": [],
    "aot": ["--label_smoothing", "0.1"], "aot_unpaired": [], "apo_zero": [], "apo_down": [], "discopop": [],
    "sigmoid_norm": [], "rpo": ["--rpo_alpha", "0.7"],
}


@pytest.fixture(scope="module")
def loss_setup(files):
    """Policy log-probs of 4 pairs (fixed by the seeded tiny model) and fixed reference log-probs."""
    settings = settings_for(files["tiny"], files["data"], "--dpo_policy", "full", "--precompute_ref_log_probs", "true")
    tokenizer = load_tokenizer(settings, str(files["tiny"]))
    splits = build_preference_dataset(settings, tokenizer)
    model = load_model(settings, str(files["tiny"]), dtype=torch.float32)
    pc, pr = pair_log_probs(model, splits["train"].select(range(4)), 2)
    rc = pc - torch.tensor([0.8, -0.3, 2.5, 0.1])
    rr = pr - torch.tensor([-0.4, 0.6, -1.5, 0.1])
    return files, pc, pr, rc, rr


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_each_loss_equals_its_paper_formula_on_fixed_log_probs(loss_setup, case):
    files, pc, pr, rc, rr = loss_setup
    loss_type = {"cdpo": "sigmoid", "rpo": "sigmoid"}.get(case, case)
    flags = ["--dpo_policy", "full", "--precompute_ref_log_probs", "true", "--beta", "0.3", "--loss_type", loss_type]
    settings = settings_for(files["tiny"], files["data"], *flags, *LOSS_CASES[case])
    trainer = trainer_for(settings, files["tiny"])
    batch = first_batch(trainer)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = rc, rr
    trainer.model.train()
    got = trainer.compute_loss(trainer.model, batch).item()

    mask = batch["completion_mask"][:, 1:].bool()
    lc, lr = mask.sum(1).float().chunk(2)
    answer_tokens = sum(len(trainer.train_dataset[i]["chosen_ids"]) for i in range(4))
    chosen_nll = -pc.sum() / answer_tokens  # TRL's "sft": mean NLL over the batch's chosen tokens
    hand = _hand_loss(case, pc, pr, rc, rr, lc, lr, 0.3, settings.label_smoothing, chosen_nll)
    assert got == pytest.approx(hand.mean().item(), rel=1e-5, abs=1e-6)


def test_label_smoothing_on_a_loss_that_ignores_it_is_an_error(files):
    settings = settings_for(files["tiny"], files["data"], "--loss_type", "hinge", "--label_smoothing", "0.1")
    with pytest.raises(ValueError, match="label_smoothing"):
        trainer_for(settings, files["tiny"])


def test_unknown_loss_type_is_rejected_by_the_settings():
    with pytest.raises(Exception, match="loss_type"):
        get_settings(["--loss_type", "kto"], env_file=None)


# ---------------------------------------------------------------- record formats


def test_every_preference_format_gives_the_same_prompt_and_answers():
    q, good, bad = "What is 2+2?", "4", "5"
    user = {"role": "user", "content": q}
    records = [
        {"prompt": q, "chosen": good, "rejected": bad},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]},
        {"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": good},
         "rejected": {"from": "gpt", "value": bad}},
        {"chosen": [user, {"role": "assistant", "content": good}], "rejected": [user, {"role": "assistant", "content": bad}]},
        {"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"},
    ]
    for record in records:
        prompt, chosen, rejected = to_preference(record)
        assert [(m["role"], m["content"]) for m in prompt] == [("user", q)]
        assert (chosen, rejected) == (good, bad)
    prompt, _, _ = to_preference({"instruction": q, "input": "", "chosen": good, "rejected": bad})
    assert prompt[-1]["instruction"] == q  # alpaca keeps its fields for the canonical prompt


def test_multi_turn_transcripts_share_every_turn_but_the_last():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    prompt, chosen, rejected = to_preference({
        "chosen": turns + [{"role": "assistant", "content": "4"}], "rejected": turns + [{"role": "assistant", "content": "5"}]})
    assert prompt == turns and (chosen, rejected) == ("4", "5")


@pytest.mark.parametrize("record, field", [
    ({"prompt": "q", "chosen": "a"}, "rejected"),
    ({"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "chosen"),
    ({"chosen": "just text", "rejected": "other text"}, "chosen"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other q"}, {"role": "assistant", "content": "b"}]}, "chosen"),
])
def test_malformed_records_name_the_record_and_field(record, field):
    with pytest.raises(DatasetError) as info:
        to_preference(record, source="pairs.jsonl", index=3)
    assert info.value.index == 3 and info.value.field.startswith(field) and "pairs.jsonl" in str(info.value)


# ---------------------------------------------------------------- the example


def test_example_runs_end_to_end_on_a_tiny_model(files, capsys):
    out = files["root"] / "example-out"
    summary = dpo_example.main([
        "--base_model_name", str(files["tiny"]), "--output_dir", str(out), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--max_length", "192", "--logging_steps", "1",
    ])
    printed = capsys.readouterr().out
    for line in ("=== before training ===", "=== after training ===", "held-out preference accuracy"):
        assert line in printed
    assert summary["eval_reward_accuracy_before"] == 0.0 and summary["eval_reward_margin_before"] == 0.0
    final = Path(summary["final_dir"])
    assert (final / "adapter_config.json").is_file() and not (final / "ref").exists()
    assert json.loads((final / "run_settings.json").read_text())["dpo_dataset_path"] == "data/preference_demo.jsonl"
    rows = check_run_outputs(out, final, printed, max_steps=3, technique="DPO (beta 0.1, sigmoid) on a LoRA policy",
                             library="peft", logged_keys=("loss", "grad_norm", "rewards/margins", "rewards/accuracies"))
    assert rows[0]["eval_rewards/margins"] == 0.0  # policy == reference before training


@pytest.mark.skipif(not (SHARED / "datasets/llamafactory/dpo_en_demo.json").is_file(),
                    reason="../shared/datasets/llamafactory/dpo_en_demo.json is absent (a clone without ../shared)")
def test_example_trains_on_llamafactory_sharegpt_preference_pairs(files, capsys):
    data = SHARED / "datasets/llamafactory/dpo_en_demo.json"
    summary = dpo_example.main([
        "--base_model_name", str(files["tiny"]), "--output_dir", str(files["root"] / "lf-out"),
        "--dpo_dataset_path", str(data), "--eval_split_size", "8", "--max_steps", "2", "--max_length", "96",
        "--max_prompt_length", "64", "--per_device_train_batch_size", "2",
    ])
    assert summary["train_pairs"] == 292 and summary["eval_pairs"] == 8
    assert math.isfinite(summary["train_loss"])


@pytest.mark.slow
def test_example_on_the_default_model_learns_the_held_out_preference(tmp_path):
    summary = dpo_example.main(["--output_dir", str(tmp_path)])
    assert summary["held_out_accuracy_after"] > summary["held_out_accuracy_before"]
    assert summary["eval_reward_accuracy_after"] > 0.5


def test_liger_kernels_are_refused_for_dpo_rather_than_ignored():
    from techniques.dpo import dpo_config

    with pytest.raises(ValueError, match="use_liger_kernel=true is an SFT setting"):
        dpo_config(Settings(_env_file=None, use_liger_kernel=True))
