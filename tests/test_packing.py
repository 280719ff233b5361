"""Packing: several examples in one row must behave exactly like each example alone.

Checked on a tiny random Llama for the attention kernels used on CPU (sdpa_varlen, sdpa, eager): logits and the
summed loss of a packed row equal those of the examples run one by one, and a naive pack (plain
causal mask over the row) does not, so the comparison can fail. Then the trainer that
techniques/sft.py builds with `packing=true` is checked to feed exactly such rows.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import attention
from config import get_settings
from data.dataset import build_sft_dataset_with_report
from data.examples import IGNORE_INDEX
from models import load_model, load_tokenizer
from techniques.sft import build_sft_trainer, sft_config
from tests.tiny import make_model, make_tokenizer, one_torch_thread
from tests.tiny_model import make_tiny_model_dir

ATTENTION = ["sdpa_varlen", "sdpa", "eager"]
attention.register()  # tests build models from a config, not through models.load_model


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():  # tiny models: see tests/tiny.py
        yield


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions (labels shifted as HF models do)."""
    return F.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.size(-1)), labels[..., 1:].reshape(-1), reduction="sum"
    )


@pytest.fixture(scope="module")
def two_examples():
    tokenizer = make_tokenizer("chatml")
    a = {"input_ids": [5, 17, 42], "labels": [IGNORE_INDEX, 17, 42]}  # 3 tokens
    b = {"input_ids": [9, 23, 77, 31, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 77, 31, 8]}  # 5 tokens
    return tokenizer, a, b


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_row_equals_each_example_alone(two_examples, attn):
    tokenizer, a, b = two_examples
    model = make_model(tokenizer, attn_implementation=attn)
    # the collator the trainer uses with packing: one row, position ids restarting, no attention mask
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([a, b])
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]] and "attention_mask" not in packed
    assert packed["labels"][0, 3].item() == IGNORE_INDEX  # b's first token is never a target of a's last
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits for e in (a, b)]
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        naive = model(input_ids=packed["input_ids"], use_cache=False).logits  # positions 0..7, plain causal mask
        cached = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits

    torch.testing.assert_close(together, torch.cat(alone, dim=1), atol=1e-5, rtol=0)
    separate = sum(summed_loss(lg, torch.tensor([e["labels"]])) for lg, e in zip(alone, (a, b), strict=True))
    torch.testing.assert_close(summed_loss(together, packed["labels"]), separate, atol=1e-5, rtol=0)
    # the test can fail: b attends to a under a plain causal mask, and with a KV cache transformers
    # does not build the block-diagonal mask at all (why TRL forces use_cache=False)
    assert not torch.allclose(naive[:, 3:], alone[1], atol=1e-3)
    if attn == "sdpa_varlen":  # it reads the bounds from the position ids, cache or not
        torch.testing.assert_close(cached, torch.cat(alone, dim=1), atol=1e-5, rtol=0)
    else:
        assert not torch.allclose(cached[:, 3:], alone[1], atol=1e-3)
    torch.testing.assert_close(naive[:, :3], alone[0], atol=1e-5, rtol=0)  # a comes first: it sees nothing else


def test_first_token_of_next_example_would_be_a_target_without_the_collator_mask(two_examples):
    tokenizer, a, b = two_examples
    model = make_model(tokenizer)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([a, b])
    leaky = packed["labels"].clone()
    leaky[0, 3] = b["input_ids"][0]  # what concatenating labels without masking example starts gives
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    assert summed_loss(logits, leaky) > summed_loss(logits, packed["labels"]) + 1e-3


# --------------------------------------------------------------------------------------------
# The trainer techniques/sft.py builds
# --------------------------------------------------------------------------------------------

RECORDS = [
    {"instruction": "Say hi.", "output": "Hi."},
    {"instruction": "What is two plus two?", "output": "The answer is 4."},
    {"instruction": "Tell me a joke about cats and dogs.", "output": "Cats and dogs."},
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Give three tips for staying healthy.", "output": "Sleep, eat well, walk."},
    {"instruction": "Translate the sentence into French.", "output": "Bonjour."},
]


def packed_trainer(tmp_path, attn: str, *flags: str):
    model_dir = make_tiny_model_dir(tmp_path)
    data_path = tmp_path / "train.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    settings = get_settings(
        [
            "--base_model_name", str(model_dir), "--dataset_path", str(data_path), "--prompt_template", "chatml",
            "--max_seq_length", "128", "--eval_split_size", "0", "--per_device_train_batch_size", "2",
            "--mixed_precision", "no", "--output_dir", str(tmp_path / "out"), "--attn_implementation", attn,
            "--packing", "true", *flags,
        ],
        env_file=None,
    )
    tokenizer = load_tokenizer(settings, model_dir)
    data, report = build_sft_dataset_with_report(settings, tokenizer)
    model = load_model(settings, model_dir, dtype=torch.float32)
    return build_sft_trainer(model, tokenizer, data, settings), data, report, tokenizer


@pytest.mark.parametrize("attn", ATTENTION)
def test_trainer_with_packing_feeds_restarting_position_ids_and_isolated_examples(tmp_path, attn):
    trainer, data, report, tokenizer = packed_trainer(tmp_path, attn)
    assert trainer.model.config._attn_implementation == attn
    train = report.splits["train"]
    assert trainer.train_dataset.num_rows == train.packed_rows < train.kept  # rows hold several examples
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch  # without one, transformers derives the mask from position ids
    positions, ids, labels = batch["position_ids"][0], batch["input_ids"][0], batch["labels"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) > 2  # 2 packed rows, each of several examples, concatenated
    by_ids = {tuple(row["input_ids"]): row["labels"] for row in data["train"]}
    for start, end in zip(starts, starts[1:] + [len(positions)], strict=True):
        assert positions[start:end].tolist() == list(range(end - start))  # restart at 0 per example
        assert labels[start].item() == IGNORE_INDEX
        assert labels[start:end].tolist() == by_ids[tuple(ids[start:end].tolist())]  # whole examples, own labels

    # the loss the trainer computes on the packed batch equals that of the same examples padded
    examples = [
        {"input_ids": ids[s:e].tolist(), "labels": labels[s:e].tolist()}
        for s, e in zip(starts, starts[1:] + [len(positions)], strict=True)
    ]
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    naive = {k: v for k, v in batch.items() if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")}
    naive = {**naive, "position_ids": torch.arange(len(positions))[None]}
    with torch.no_grad():
        packed_loss = trainer.compute_loss(trainer.model, dict(batch))
        padded_loss = trainer.compute_loss(trainer.model, padded)
        naive_loss = trainer.compute_loss(trainer.model, naive)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=0)
    assert abs(naive_loss - padded_loss) > 1e-4  # a plain causal mask over the row would leak

    # the dataset report counts the rows the trainer packed
    assert train.packing_efficiency == pytest.approx(train.total_tokens / (train.packed_rows * 128))
    table = report.format()
    assert "packing=true" in table and "packed_rows" in table and "packing_efficiency" in table
    assert f"{train.packing_efficiency:.3f}" in table.splitlines()[2]


def test_trainer_trains_with_packing(tmp_path):
    trainer, *_ = packed_trainer(tmp_path, "sdpa", "--max_steps", "2", "--logging_steps", "1")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_packing_is_off_and_padding_free_on_by_default():
    settings = get_settings([], env_file=None)
    config = sft_config(settings)
    assert settings.packing is False and config.packing is False
    assert settings.padding_free is True and config.padding_free is True
    assert settings.attn_implementation == "sdpa_varlen"
    assert config.max_length is None  # examples arrive truncated by the builder's documented rule
    assert sft_config(get_settings(["--padding_free", "false"], env_file=None)).padding_free is False


# --------------------------------------------------------------------------------------------
# sdpa_varlen: attention once per example, no dense mask over the row
# --------------------------------------------------------------------------------------------


class SdpaCalls:
    """Records (query length, attn_mask shape or None, is_causal) of every sdpa call."""

    def __init__(self, monkeypatch):
        self.calls, inner = [], F.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, *args, is_causal=False, **kwargs):
            self.calls.append((query.shape[2], None if attn_mask is None else tuple(attn_mask.shape), is_causal))
            return inner(query, key, value, attn_mask, *args, is_causal=is_causal, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)


def test_sdpa_varlen_attends_once_per_example_without_a_mask(two_examples, monkeypatch):
    tokenizer, a, b = two_examples
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([a, b])
    model = make_model(tokenizer, attn_implementation="sdpa_varlen")
    layers = model.config.num_hidden_layers
    sdpa = SdpaCalls(monkeypatch)
    with torch.no_grad():
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)
    assert sdpa.calls == [(3, None, True), (5, None, True)] * layers
    # plain sdpa builds one (1, 1, 8, 8) block-diagonal mask for the row: T^2, not 3^2 + 5^2
    sdpa.calls.clear()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)
    assert sdpa.calls == [(8, (1, 1, 8, 8), False)] * layers


def test_sdpa_varlen_gradients_equal_each_example_alone(two_examples):
    tokenizer, a, b = two_examples
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([a, b])
    model = make_model(tokenizer, attn_implementation="sdpa_varlen").train()
    loss = summed_loss(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits, packed["labels"])
    loss.backward()
    together = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    separate = sum(summed_loss(model(input_ids=torch.tensor([e["input_ids"]])).logits, torch.tensor([e["labels"]]))
                   for e in (a, b))
    separate.backward()
    torch.testing.assert_close(loss, separate, atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(together[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_sdpa_varlen_keeps_padded_batches_and_generation_plain(two_examples):
    tokenizer, a, b = two_examples
    varlen, plain = (make_model(tokenizer, attn_implementation=attn) for attn in ("sdpa_varlen", "sdpa"))
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)([a, b])
    assert padded["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    with torch.no_grad():
        logits = [m(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits for m in (varlen, plain)]
        texts = [m.generate(torch.tensor([b["input_ids"]]), max_new_tokens=6, do_sample=False) for m in (varlen, plain)]
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)
    assert texts[0].tolist() == texts[1].tolist()


def test_sdpa_varlen_sliding_window_layers_keep_their_window():
    """A sliding-window model: its layers get transformers' own mask (window and packed bounds)."""
    from transformers import MistralConfig, MistralForCausalLM

    from tests.tiny_model import TINY_CONFIG

    config = {k: v for k, v in TINY_CONFIG.items() if k in MistralConfig().to_dict()}
    models = {}
    for attn in ("sdpa_varlen", "eager"):
        torch.manual_seed(0)
        models[attn] = MistralForCausalLM(MistralConfig(**{**config, "vocab_size": 64, "sliding_window": 3},
                                                        attn_implementation=attn)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    with torch.no_grad():
        varlen, eager = (m(input_ids=ids, position_ids=positions, use_cache=False).logits for m in models.values())
        alone = models["eager"](input_ids=ids[:, :5], use_cache=False).logits
        full = models["sdpa_varlen"](input_ids=ids[:, :5], use_cache=False).logits
    torch.testing.assert_close(varlen, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(varlen[:, :5], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=0)  # unpacked: window kept too


def test_load_model_keeps_plain_sdpa_for_a_model_without_flash_attention_support(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    model_dir = make_tiny_model_dir(tmp_path)
    settings = get_settings(["--base_model_name", str(model_dir)], env_file=None)
    assert load_model(settings, model_dir).config._attn_implementation == "sdpa_varlen"
    monkeypatch.setattr(LlamaForCausalLM, "_supports_flash_attn", False)
    assert load_model(settings, model_dir).config._attn_implementation == "sdpa"


def test_padding_free_trainer_batch_is_one_row_and_its_loss_equals_the_padded_one(tmp_path):
    trainer, data, _, tokenizer = packed_trainer(tmp_path, "sdpa_varlen")
    settings = get_settings(["--base_model_name", str(make_tiny_model_dir(tmp_path / "m")),
                             "--dataset_path", str(tmp_path / "train.jsonl"), "--prompt_template", "chatml",
                             "--eval_split_size", "0", "--per_device_train_batch_size", "3", "--mixed_precision", "no",
                             "--output_dir", str(tmp_path / "out2"), "--group_by_length", "false"], env_file=None)
    assert settings.padding_free and not settings.packing
    trainer = build_sft_trainer(trainer.model, tokenizer, data, settings)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 3  # the step's 3 examples, not packed rows
    bounds = starts + [batch["input_ids"].shape[1]]
    examples = [{"input_ids": batch["input_ids"][0, s:e].tolist(), "labels": batch["labels"][0, s:e].tolist()}
                for s, e in zip(bounds[:-1], bounds[1:])]
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(batch)),
                                   trainer.compute_loss(trainer.model, padded), atol=1e-5, rtol=0)
