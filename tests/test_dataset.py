"""Tests for data/: readers and loaders, templates, label masks, truncation, splits, the builder and its report.

Tiny tokenizers come from tests/tiny.py (byte-level BPE trained in-process). Tests that read the
reference files in ../shared skip when that folder is absent.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from data.dataset import build_sft_dataset, build_sft_dataset_with_report
from data.errors import DatasetError
from data.examples import IGNORE_INDEX, build_sft_example, encode_prompt
from data.readers import (
    detect_format,
    held_out_prompt,
    load_messages,
    load_records,
    load_splits,
    parse_role_map,
    split_records,
    to_messages,
)
from data.templates import check_template_tokens, render, stop_token_ids, turn_end_token
from tests.tiny import make_model, make_tokenizer, one_torch_thread

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEMPLATE_FILES = {
    "chatml": "chatml.jinja",
    "phi3": "phi-3-mini-4k-instruct.jinja",
    "llama3": "llama-3-instruct.jinja",
}
TURN_END = {"chatml": "<|im_end|>", "phi3": "<|end|>", "llama3": "<|eot_id|>"}
# (tokenizer family, template): each family's hand-written template and its own chat template
FAMILY_TEMPLATES = [(f, f) for f in TEMPLATE_FILES] + [(f, "tokenizer") for f in TEMPLATE_FILES]


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"reference file {path} is absent (../shared is only in project checkouts)")
    return path


def official_tokenizer(family: str):
    """Tiny tokenizer of `family` with the official chat template of that family."""
    tokenizer = make_tokenizer(family)
    tokenizer.chat_template = shared_file(f"reference/templates/{TEMPLATE_FILES[family]}").read_text()
    return tokenizer


def user(content, **extra):
    return {"role": "user", "content": content, **extra}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


CONVERSATIONS = {
    "single": [user("Hello!"), assistant("Hi, how are you?")],
    "system": [system("Be brief."), user("What is two plus two?"), assistant("The answer is 4.")],
    # leading/trailing whitespace and inner newlines exercise llama3's trim and segment boundaries
    "multi_turn": [
        system("You are a helpful assistant."),
        user(" What is two plus two? "),
        assistant("The answer is 4.\n"),
        user("Tell me a joke."),
        assistant(" Cats and dogs.\nThe end."),
    ],
    "ends_with_user": [system("Be brief."), user("Hello!"), assistant("Hi."), user("Tell me a joke.")],
}
TRAINABLE = ["single", "system", "multi_turn"]


def supervised_runs(example) -> list[list[int]]:
    """Maximal runs of consecutive positions whose label is not -100, as token id lists."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # labels are the (unshifted) input ids where supervised
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def settings(**overrides):
    values = dict(
        dataset_path="",
        dataset_format="auto",
        prompt_template="chatml",
        system_prompt=None,
        max_seq_length=512,
        eval_dataset_path=None,
        eval_split_size=0.0,
        seed=0,
        truncation_strategy="truncate_prompt",
        train_on_last_turn_only=False,
        role_map=[],
        packing=False,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def alpaca_records(n: int) -> list[dict]:
    return [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"} for i in range(n)]


# --------------------------------------------------------------------------------------------
# Templates: exact strings and parity with the official jinja templates
# --------------------------------------------------------------------------------------------


def test_render_exact_strings_of_hand_written_templates():
    conversation = [system("Be brief."), user(" Hi "), assistant("Hello.")]
    chatml, phi3, llama3 = make_tokenizer("chatml"), make_tokenizer("phi3"), make_tokenizer("llama3")
    assert render(conversation, "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    assert render(conversation, "phi3", phi3) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\n Hi <|end|>\n<|assistant|>\nHello.<|end|>\n<|endoftext|>"
    )
    assert render(conversation[:2], "phi3", phi3, add_generation_prompt=True) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\n Hi <|end|>\n<|assistant|>\n"
    )
    assert render(conversation, "llama3", llama3) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    )
    assert render(conversation[:2], "chatml", chatml, add_generation_prompt=True).endswith(
        "<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("family", list(TEMPLATE_FILES))
def test_render_is_byte_identical_to_official_template(family, name, add_generation_prompt):
    tokenizer = official_tokenizer(family)
    messages = CONVERSATIONS[name]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert render(messages, family, tokenizer, add_generation_prompt) == expected
    assert render(messages, "tokenizer", tokenizer, add_generation_prompt) == expected


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("family, template", FAMILY_TEMPLATES)
def test_ids_equal_apply_chat_template(family, template, name):
    tokenizer = official_tokenizer(family)
    messages = CONVERSATIONS[name]
    example = build_sft_example(messages, tokenizer, template, max_seq_length=4096)
    assert example["input_ids"] == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def parse_alpaca_reference() -> tuple[str, str]:
    text = shared_file("reference/alpaca_prompt.txt").read_text()
    with_input, without_input = re.findall(r"<<<BEGIN>>>\n(.*?)\n<<<END>>>", text, flags=re.S)
    return with_input, without_input


def test_alpaca_matches_stanford_prompt_with_and_without_input():
    prompt_input, prompt_no_input = parse_alpaca_reference()
    tokenizer = make_tokenizer("llama3")
    record = {"instruction": "Reverse the words.", "input": "Hello world", "output": "world Hello"}
    expected = prompt_input.format_map(record) + record["output"] + tokenizer.eos_token
    assert render(to_messages(record), "alpaca", tokenizer) == expected
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    expected = prompt_no_input.format_map(record) + "Blue." + "<|end_of_text|>"
    assert render(to_messages(record), "alpaca", tokenizer) == expected


def test_alpaca_exact_text_system_and_multi_turn_rule():
    eos = "<|im_end|>"
    tokenizer = make_tokenizer("chatml")
    record = {"instruction": "Add.", "input": "2 and 2", "output": "4", "system": "You add numbers."}
    assert render(to_messages(record), "alpaca", tokenizer) == (
        "You add numbers.\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 2\n\n### Response:4" + eos
    )
    messages = [user("Hi."), assistant("Hello."), user("Bye."), assistant("Goodbye.")]
    assert render(messages, "alpaca", tokenizer) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nHi.\n\n### Response:Hello."
        + eos
        + "\n\n### Instruction:\nBye.\n\n### Response:Goodbye."
        + eos
    )
    # the response header belongs to the user turn, so the generation prompt is the same text
    assert render(messages[:3], "alpaca", tokenizer, add_generation_prompt=True) == render(
        messages[:3], "alpaca", tokenizer
    )
    assert render(messages[:3], "alpaca", tokenizer).endswith("### Instruction:\nBye.\n\n### Response:")


# --------------------------------------------------------------------------------------------
# Label masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, template", FAMILY_TEMPLATES)
def test_supervised_tokens_are_each_assistant_content_plus_turn_end(family, template):
    tokenizer = official_tokenizer(family)
    messages = CONVERSATIONS["multi_turn"]
    example = build_sft_example(messages, tokenizer, template, max_seq_length=4096)
    strip = str.strip if family == "llama3" else (lambda s: s)  # llama3's template trims content
    expected = [strip(m["content"]) + TURN_END[family] for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in supervised_runs(example)] == expected
    # the supervised ids are exactly the separately tokenized content + one turn-end token
    end_id = tokenizer.convert_tokens_to_ids(TURN_END[family])
    assert supervised_runs(example)[-1] == tokenizer.encode(
        strip(messages[-1]["content"]), add_special_tokens=False
    ) + [end_id]


def test_alpaca_labels_multi_turn_and_prompt_masked():
    tokenizer = make_tokenizer("chatml")
    messages = [user("Hi.", instruction="Hi.", input=""), assistant("Hello."), user("Bye."), assistant("Goodbye.")]
    example = build_sft_example(messages, tokenizer, "alpaca", max_seq_length=4096)
    assert [tokenizer.decode(r) for r in supervised_runs(example)] == ["Hello.<|im_end|>", "Goodbye.<|im_end|>"]
    prompt = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label == IGNORE_INDEX]
    assert tokenizer.decode(prompt).startswith("Below is an instruction")
    assert tokenizer.decode(prompt).endswith("\n\n### Instruction:\nBye.\n\n### Response:")


def test_chatml_label_positions_pinned_and_pad_equal_eos_keeps_eos():
    tokenizer = make_tokenizer("chatml")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == 1
    example = build_sft_example([user("2+2?"), assistant("4")], tokenizer, "chatml", max_seq_length=64)
    pieces = [tokenizer.decode([t]) for t in example["input_ids"]]
    assert pieces == [
        "<|im_start|>",
        "user",
        "\n",
        "2",
        "+",
        "2",
        "?",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "assistant",
        "\n",
        "4",
        "<|im_end|>",
        "\n",
    ]
    supervised_at = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert supervised_at == [12, 13]
    assert example["labels"][13] == 1  # the real EOS is supervised although it is also the pad id
    assert example["labels"][7] == IGNORE_INDEX  # the user turn's <|im_end|> is not


def test_alpaca_eos_label_with_pad_equal_eos():
    tokenizer = make_tokenizer("chatml")
    example = build_sft_example(to_messages({"instruction": "Hi", "output": "Hello"}), tokenizer, "alpaca", 256)
    assert example["input_ids"][-1] == example["labels"][-1] == tokenizer.pad_token_id == 1
    assert tokenizer.decode(supervised_runs(example)[0]) == "Hello<|im_end|>"


def test_phi3_trailing_eos_and_newline_are_not_supervised():
    tokenizer = make_tokenizer("phi3")
    example = build_sft_example([user("Hi"), assistant("Hello")], tokenizer, "phi3", 64)
    assert [tokenizer.decode([t]) for t in example["input_ids"][-3:]] == ["<|end|>", "\n", "<|endoftext|>"]
    assert example["labels"][-3:] == [tokenizer.convert_tokens_to_ids("<|end|>"), IGNORE_INDEX, IGNORE_INDEX]
    assert tokenizer.decode(supervised_runs(example)[0]) == "Hello<|end|>"


def test_train_on_last_turn_only():
    tokenizer = make_tokenizer("chatml")
    example = build_sft_example(CONVERSATIONS["multi_turn"], tokenizer, "chatml", 4096, train_on_last_turn_only=True)
    assert [tokenizer.decode(r) for r in supervised_runs(example)] == [" Cats and dogs.\nThe end.<|im_end|>"]


def test_answer_boundary_supervises_exactly_the_completion_tokens():
    # prompt ends with a space, completion has none: whole-string tokenization would fuse " four"
    tokenizer = make_tokenizer("plain")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\nAnswer: "
        "{% else %}{{ m['content'] + eos_token }}\n{% endif %}{% endfor %}"
    )
    messages = [user("What is two plus two?"), assistant("four")]
    example = build_sft_example(messages, tokenizer, "tokenizer", max_seq_length=256)
    four = tokenizer.encode("four", add_special_tokens=False)
    assert four != tokenizer.encode(" four", add_special_tokens=False)
    assert supervised_runs(example) == [four + [tokenizer.eos_token_id]]
    assert tokenizer.decode(supervised_runs(example)[0]) == "four</s>"
    prompt_end = example["labels"].index(four[0])
    assert tokenizer.decode(example["input_ids"][:prompt_end]) == "Question: What is two plus two?\nAnswer: "
    assert tokenizer.decode(example["input_ids"][prompt_end + len(four) + 1 :]) == "\n"
    assert turn_end_token("tokenizer", tokenizer) == "</s>"


# --------------------------------------------------------------------------------------------
# BOS, template tokens, stop ids
# --------------------------------------------------------------------------------------------


def test_smollm2_own_template_adds_its_default_system_prompt():
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = shared_file("reference/templates/smollm2-instruct.jinja").read_text()
    messages = CONVERSATIONS["multi_turn"][1:]  # no system turn: the template adds its own
    example = build_sft_example(messages, tokenizer, "tokenizer", 4096)
    assert example["input_ids"] == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert tokenizer.decode(example["input_ids"]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    assert [tokenizer.decode(r) for r in supervised_runs(example)] == [
        "The answer is 4.\n<|im_end|>",
        " Cats and dogs.\nThe end.<|im_end|>",
    ]
    assert not render(messages, "chatml").startswith("<|im_start|>system")  # generic ChatML adds none


def test_tokenizer_template_needs_a_chat_template():
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        render(CONVERSATIONS["single"], "tokenizer", make_tokenizer("chatml"))


def test_exactly_one_bos_with_llama3_own_template():
    llama = official_tokenizer("llama3")
    example = build_sft_example(CONVERSATIONS["multi_turn"], llama, "tokenizer", 4096)
    assert example["input_ids"][0] == llama.bos_token_id and example["input_ids"].count(llama.bos_token_id) == 1


def test_exactly_one_bos():
    llama = make_tokenizer("llama3")
    assert llama("x")["input_ids"][0] == llama.bos_token_id  # this tokenizer adds a BOS by default
    for template in ("llama3", "alpaca"):
        example = build_sft_example(CONVERSATIONS["multi_turn"], llama, template, 4096)
        assert example["input_ids"][0] == llama.bos_token_id
        assert example["input_ids"].count(llama.bos_token_id) == 1, template
    # phi3's template writes no BOS (apply_chat_template adds none either); chatml's bos opens turns
    phi3 = make_tokenizer("phi3")
    assert phi3.bos_token_id not in build_sft_example(CONVERSATIONS["system"], phi3, "phi3", 4096)["input_ids"]
    assert build_sft_example(CONVERSATIONS["system"], phi3, "alpaca", 4096)["input_ids"].count(phi3.bos_token_id) == 1
    chatml = make_tokenizer("chatml")
    alpaca = build_sft_example(CONVERSATIONS["system"], chatml, "alpaca", 4096)
    assert chatml.bos_token_id not in alpaca["input_ids"]  # this tokenizer adds no BOS, nor does Stanford's recipe


@pytest.mark.parametrize(
    "family, template", [("chatml", "chatml"), ("phi3", "phi3"), ("llama3", "llama3"), ("llama3", "alpaca")]
)
def test_encode_prompt_is_the_prefix_of_the_training_ids(family, template):
    tokenizer = make_tokenizer(family)
    messages = CONVERSATIONS["multi_turn"]
    prompt = encode_prompt(messages[:-1], template, tokenizer)
    assert build_sft_example(messages, tokenizer, template, 4096)["input_ids"][: len(prompt)] == prompt
    assert tokenizer.decode(prompt).endswith(render(messages[:-1], template, tokenizer, add_generation_prompt=True))


def test_encode_prompt_never_doubles_the_llama3_bos():
    tokenizer = make_tokenizer("llama3")
    prompt = encode_prompt(CONVERSATIONS["system"][:-1], "llama3", tokenizer)
    assert prompt.count(tokenizer.bos_token_id) == 1
    naive = tokenizer(render(CONVERSATIONS["system"][:-1], "llama3", tokenizer, True))["input_ids"]
    assert naive.count(tokenizer.bos_token_id) == 2  # the pitfall encode_prompt avoids


def test_missing_template_tokens_raise_naming_template_and_tokens():
    with pytest.raises(ValueError, match=r"'llama3'.*<\|start_header_id\|>.*<\|eot_id\|>"):
        build_sft_example(CONVERSATIONS["single"], make_tokenizer("chatml"), "llama3", 64)
    with pytest.raises(ValueError, match=r"'chatml'.*<\|im_start\|>.*<\|im_end\|>"):
        check_template_tokens("chatml", make_tokenizer("plain"))
    with pytest.raises(ValueError, match="no chat_template"):
        check_template_tokens("tokenizer", make_tokenizer("plain"))
    with pytest.raises(ValueError, match="unknown prompt template 'zephyr'"):
        render(CONVERSATIONS["single"], "zephyr", make_tokenizer("plain"))


def test_stop_token_ids_and_turn_end_token():
    llama, phi3, chatml = make_tokenizer("llama3"), make_tokenizer("phi3"), make_tokenizer("chatml")
    assert turn_end_token("llama3", llama) == "<|eot_id|>"
    assert stop_token_ids("llama3", llama) == [1, 4]  # <|end_of_text|>, <|eot_id|>
    assert stop_token_ids("phi3", phi3) == [1, 5]  # <|endoftext|>, <|end|>
    assert stop_token_ids("chatml", chatml) == [1]  # eos is the turn end: deduplicated
    assert stop_token_ids("alpaca", llama) == [1]
    assert turn_end_token("alpaca", chatml) == "<|im_end|>"


def test_turn_end_token_of_official_templates():
    assert turn_end_token("tokenizer", official_tokenizer("llama3")) == "<|eot_id|>"
    assert turn_end_token("tokenizer", official_tokenizer("phi3")) == "<|end|>"
    assert turn_end_token("tokenizer", official_tokenizer("chatml")) == "<|im_end|>"
    assert stop_token_ids("tokenizer", official_tokenizer("llama3")) == [1, 4]


# --------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------


def test_truncate_prompt_drops_from_the_left_as_documented():
    tokenizer = make_tokenizer("chatml")
    messages = [user("2+2?"), assistant("4")]
    full = build_sft_example(messages, tokenizer, "chatml", 64)
    assert len(full["input_ids"]) == 15
    cut = build_sft_example(messages, tokenizer, "chatml", 10)
    assert cut["input_ids"] == full["input_ids"][5:] and cut["labels"] == full["labels"][5:]
    assert tokenizer.decode(cut["input_ids"]) == "2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    # the cut stops at the user turn's end + the assistant header; an answer is never cut or left alone
    header_only = build_sft_example(messages, tokenizer, "chatml", 8)
    assert header_only["input_ids"] == full["input_ids"][7:] and header_only["labels"] == full["labels"][7:]
    assert build_sft_example(messages, tokenizer, "chatml", 7) is None
    assert build_sft_example(messages, tokenizer, "chatml", 2) is None


def test_truncate_prompt_keeps_bos_and_drops_answers_that_leave_no_room_for_their_header():
    tokenizer = make_tokenizer("llama3")
    messages = [user("Tell me a joke about cats and dogs."), assistant("The quick brown fox jumps over the lazy dog.")]
    full = build_sft_example(messages, tokenizer, "llama3", 4096)
    s = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    n = len(full["input_ids"]) - 3
    cut = build_sft_example(messages, tokenizer, "llama3", n)
    assert cut["input_ids"] == full["input_ids"][:1] + full["input_ids"][4:]
    assert cut["labels"] == [IGNORE_INDEX] + full["labels"][4:]
    # the shortest row: BOS + the user turn's <|eot_id|> + the assistant header + the whole answer
    n = min(n for n in range(1, len(full["input_ids"])) if build_sft_example(messages, tokenizer, "llama3", n))
    shortest = build_sft_example(messages, tokenizer, "llama3", n)["input_ids"]
    assert shortest == full["input_ids"][:1] + full["input_ids"][len(full["input_ids"]) - (n - 1) :]
    assert tokenizer.decode(shortest[1 : 1 + n - 1 - (len(full["input_ids"]) - s)]) == (
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_multi_turn_truncation_drops_earlier_exchanges_whole():
    """(tests/test_truncation.py tests each case; here the conversation of these tests.)"""
    tokenizer = make_tokenizer("chatml")
    messages = CONVERSATIONS["multi_turn"]
    full = build_sft_example(messages, tokenizer, "chatml", 4096)
    cut = build_sft_example(messages, tokenizer, "chatml", len(full["input_ids"]) - 20)
    assert cut == build_sft_example(messages[:1] + messages[3:], tokenizer, "chatml", 4096)  # system + last exchange


def test_drop_strategy_and_zero_supervised_examples_return_none():
    tokenizer = make_tokenizer("llama3")
    messages = CONVERSATIONS["single"]
    length = len(build_sft_example(messages, tokenizer, "llama3", 4096)["input_ids"])
    assert build_sft_example(messages, tokenizer, "llama3", length, truncation_strategy="drop") is not None
    assert build_sft_example(messages, tokenizer, "llama3", length - 1, truncation_strategy="drop") is None
    assert build_sft_example(messages, tokenizer, "llama3", 1) is None  # only the BOS would remain
    with pytest.raises(ValueError, match="truncation_strategy"):
        build_sft_example(messages, tokenizer, "llama3", 10, truncation_strategy="keep_end")


def test_report_counts_truncated_dropped_and_unsupervised(tmp_path):
    tokenizer = make_tokenizer("plain")
    # a template that skips empty assistant turns, so such a record has nothing to supervise
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\nA:"
        "{% elif m['content'] %} {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    )
    records = [
        {"instruction": "Hi", "output": "Hello"},
        {"instruction": "Hi", "output": ""},
        {"instruction": "Tell me a joke about cats and dogs. " * 3, "output": "No."},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    data, report = build_sft_dataset_with_report(
        settings(dataset_path=str(path), prompt_template="tokenizer", max_seq_length=20), tokenizer
    )
    train = report.splits["train"]
    assert (train.records, train.kept, train.truncated, train.dropped_no_supervised, train.dropped_too_long) == (
        3,
        2,
        1,
        1,
        0,
    )
    assert data["train"].num_rows == 2 and train.length_max == 20
    assert train.total_tokens == sum(len(ids) for ids in data["train"]["input_ids"])
    assert train.supervised_tokens == sum(
        sum(label != IGNORE_INDEX for label in labels) for labels in data["train"]["labels"]
    )
    _, report = build_sft_dataset_with_report(
        settings(dataset_path=str(path), prompt_template="tokenizer", max_seq_length=20, truncation_strategy="drop"),
        tokenizer,
    )
    assert (report.splits["train"].kept, report.splits["train"].dropped_too_long) == (1, 1)
    table = report.format()
    assert "dropped_too_long" in table and "dropped_no_supervised" in table
    assert re.search(r"^train\s+3\s+1\s+0\s+0\s+1\s+1\s", table.splitlines()[2])
    assert "packing=false" in table and "packed_rows" not in table  # packing columns only with packing
    assert table.splitlines()[3:] == [
        f"dropped from train: {path}: record 1: dropped_no_supervised: "
        "no supervised token (an empty answer, or every answer has weight 0)",
        f"dropped from train: {path}: record 2: dropped_too_long: "
        "its last exchange alone is longer than max_seq_length (truncation_strategy=drop)",
        "warning: train: 1 records with an empty answer (trained to answer nothing): records 1",
    ]


def test_split_left_empty_raises(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", alpaca_records(2))
    with pytest.raises(DatasetError, match="no train examples left"):
        build_sft_dataset(
            settings(dataset_path=str(path), prompt_template="llama3", max_seq_length=1), make_tokenizer("llama3")
        )


# --------------------------------------------------------------------------------------------
# Fault kinds, each over every template (alpaca, chatml, phi3, llama3, tokenizer)
# --------------------------------------------------------------------------------------------

# (tokenizer family, template); "tokenizer" runs each family's official chat template
EVERY_TEMPLATE = [
    ("chatml", "alpaca"),
    ("llama3", "alpaca"),
    ("chatml", "chatml"),
    ("phi3", "phi3"),
    ("llama3", "llama3"),
    ("chatml", "tokenizer"),
    ("phi3", "tokenizer"),
    ("llama3", "tokenizer"),
]
ONE_PER_TEMPLATE = [
    ("chatml", "alpaca"), ("chatml", "chatml"), ("phi3", "phi3"), ("llama3", "llama3"), ("llama3", "tokenizer")
]


def tokenizer_for(family: str, template: str):
    return official_tokenizer(family) if template == "tokenizer" else make_tokenizer(family)


def end_token(tokenizer, family: str, template: str) -> str:
    return tokenizer.eos_token if template == "alpaca" else TURN_END[family]


def as_rendered(family: str, template: str, content: str) -> str:
    return content.strip() if family == "llama3" and template != "alpaca" else content  # llama3 trims


@pytest.mark.parametrize("family, template", EVERY_TEMPLATE)
def test_pad_equal_eos_keeps_the_end_token_label_in_a_collated_batch(family, template):
    """Fault 1 (EOS never learned): collated by TRL's collator, with pad == eos, only padding is -100."""
    tokenizer = tokenizer_for(family, template)
    tokenizer.pad_token = tokenizer.eos_token  # the pitfall: the pad id is also a real token in the text
    end_id = tokenizer.convert_tokens_to_ids(end_token(tokenizer, family, template))
    examples = [build_sft_example(CONVERSATIONS[n], tokenizer, template, 4096) for n in ("single", "system")]
    assert len(examples[0]["input_ids"]) != len(examples[1]["input_ids"])
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    width = batch["input_ids"].shape[1]
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        labels = batch["labels"][row].tolist()
        assert labels[:n] == example["labels"]  # the real tokens keep their labels, the end token included
        assert labels[n:] == [IGNORE_INDEX] * (width - n)  # padding, and only padding, is -100
        assert batch["input_ids"][row, n:].tolist() == [tokenizer.pad_token_id] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert supervised_runs(example)[-1][-1] == end_id and end_id in labels


@pytest.mark.parametrize("padding_free", [False, True])
def test_the_trainer_collates_with_trls_collator_and_keeps_eos_labels(tmp_path, padding_free):
    """Fault 1: the collator the SFT trainer really uses (tiny model, pad == eos like SmolLM2), padded
    or padding-free (the default: the examples one after another in one row)."""
    from config import get_settings
    from models import load_model, load_tokenizer
    from techniques.sft import build_sft_trainer
    from tests.tiny_model import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path)
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "Hi", "output": "Hello there."}, alpaca_records(1)[0]])
    config = get_settings(
        ["--base_model_name", str(model_dir), "--dataset_path", str(path), "--eval_split_size", "0",
         "--mixed_precision", "no", "--output_dir", str(tmp_path / "out"), "--prompt_template", "chatml",
         "--padding_free", str(padding_free).lower()],
        env_file=None,
    )
    tokenizer = load_tokenizer(config, model_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    data = build_sft_dataset(config, tokenizer)
    trainer = build_sft_trainer(load_model(config, model_dir), tokenizer, data, config)
    assert type(trainer.data_collator) is DataCollatorForLanguageModeling
    assert trainer.data_collator.padding_free is padding_free
    batch = trainer.data_collator([data["train"][0], data["train"][1]])
    if padding_free:  # one row: each example's labels in turn (its first token is a prompt token: -100 anyway)
        assert batch["labels"].tolist() == [data["train"][0]["labels"] + data["train"][1]["labels"]]
    for row, example in enumerate(data["train"]):
        n = len(example["input_ids"])
        if not padding_free:
            assert batch["labels"][row, :n].tolist() == example["labels"]
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert tokenizer.decode(supervised_runs(example)[-1]).endswith("<|im_end|>")


@pytest.mark.parametrize("family, template", ONE_PER_TEMPLATE)
def test_toy_trained_model_stops_right_after_the_answer(family, template):
    """Fault 1, end to end: learn one short example (pad == eos), then greedy decoding stops after it."""
    tokenizer = tokenizer_for(family, template)
    tokenizer.pad_token = tokenizer.eos_token
    messages = [user("Hello!"), assistant("I am fine.")]
    examples = [
        build_sft_example(messages, tokenizer, template, 256),
        build_sft_example([user("Hi"), assistant("Yo")], tokenizer, template, 256),  # shorter: the first is padded
    ]
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    model = make_model(tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prompt = encode_prompt(messages[:-1], template, tokenizer)
    with one_torch_thread():
        for _ in range(40):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        out = model.eval().generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=stop_token_ids(template, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    assert tokenizer.decode(out[0, len(prompt) :]) == "I am fine." + end_token(tokenizer, family, template)


@pytest.mark.parametrize("family, template", EVERY_TEMPLATE)
def test_answer_boundary_is_known_by_construction(family, template):
    """Fault 2 (response found by searching ids): the supervised ids are the completion's own ids."""
    tokenizer = tokenizer_for(family, template)
    example = build_sft_example([user("What is two plus two? Answer: "), assistant("four")], tokenizer, template, 256)
    end = end_token(tokenizer, family, template)
    four = tokenizer.encode("four", add_special_tokens=False)
    end_id = tokenizer.convert_tokens_to_ids(end)
    assert supervised_runs(example) == [four + [end_id]]
    assert tokenizer.decode(supervised_runs(example)[0]) == "four" + end
    # an echo: the user turn holds the same ids as the answer ("four" + turn end in chat templates),
    # so a search for the answer's ids would find the user turn first; only the answer is supervised
    echo = build_sft_example([user("four"), assistant("four")], tokenizer, template, 256)
    last_end = len(echo["input_ids"]) - 1 - echo["input_ids"][::-1].index(end_id)
    answer_at = list(range(last_end - len(four), last_end + 1))
    assert [i for i, label in enumerate(echo["labels"]) if label != IGNORE_INDEX] == answer_at


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("family, template", EVERY_TEMPLATE)
def test_at_most_one_bos_and_only_where_the_template_has_one(family, template, name):
    """Fault 3 (double BOS): exactly the BOS the template writes (alpaca: the tokenizer's default)."""
    tokenizer = tokenizer_for(family, template)
    messages = CONVERSATIONS[name]
    ids = build_sft_example(messages, tokenizer, template, 4096)["input_ids"]
    bos = tokenizer.bos_token_id
    adds_bos = tokenizer("a")["input_ids"][0] == bos
    expected = render(messages, template, tokenizer).count(tokenizer.bos_token) + int(template == "alpaca" and adds_bos)
    assert ids.count(bos) == expected
    assert ids[:2] != [bos, bos]
    if family != "chatml":  # chatml's "bos" <|im_start|> opens every turn; elsewhere a BOS is a BOS
        writes_bos = template == "llama3" or (family, template) == ("llama3", "tokenizer")
        assert expected == int(writes_bos or (template == "alpaca" and adds_bos))
        assert bos not in ids[1:]
    if template == "tokenizer":
        assert ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]


@pytest.mark.parametrize("family, template", EVERY_TEMPLATE)
def test_supervised_spans_end_with_the_turn_end_and_generation_config_lists_every_stop_id(
    family, template, tmp_path
):
    """Fault 4 (wrong stop token): llama3 ends turns with <|eot_id|>, phi3 with <|end|>; both stop ids saved."""
    from transformers import GenerationConfig

    from runs import outputs

    tokenizer = tokenizer_for(family, template)
    end_id = tokenizer.convert_tokens_to_ids(end_token(tokenizer, family, template))
    example = build_sft_example(CONVERSATIONS["multi_turn"], tokenizer, template, 4096)
    assert [run[-1] for run in supervised_runs(example)] == [end_id, end_id]
    expected = list(dict.fromkeys([tokenizer.eos_token_id, end_id]))
    assert len(expected) == (1 if template == "alpaca" or family == "chatml" else 2)
    assert stop_token_ids(template, tokenizer) == expected
    outputs.save_generation_config(tokenizer, SimpleNamespace(prompt_template=template), tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == expected


@pytest.mark.parametrize("family, template", EVERY_TEMPLATE)
def test_every_assistant_turn_is_supervised_and_nothing_else(family, template):
    """Fault 5 (multi-turn masking): system / user / assistant / user / assistant."""
    tokenizer = tokenizer_for(family, template)
    messages = CONVERSATIONS["multi_turn"]
    end = end_token(tokenizer, family, template)
    answers = [as_rendered(family, template, m["content"]) + end for m in messages if m["role"] == "assistant"]
    example = build_sft_example(messages, tokenizer, template, 4096)
    assert [tokenizer.decode(run) for run in supervised_runs(example)] == answers
    last_only = build_sft_example(messages, tokenizer, template, 4096, train_on_last_turn_only=True)
    assert [tokenizer.decode(run) for run in supervised_runs(last_only)] == answers[-1:]
    assert last_only["input_ids"] == example["input_ids"]


@pytest.mark.parametrize("family, template", EVERY_TEMPLATE)
def test_sharegpt_keeps_every_turn_with_roles_from_from(family, template):
    """Fault 6 (ShareGPT drops turns): the system turn and every turn survive into the ids."""
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What is two plus two?"},
            {"from": "gpt", "value": "The answer is 4."},
            {"from": "human", "value": "Tell me a joke."},
            {"from": "gpt", "value": "Cats and dogs."},
        ]
    }
    messages = to_messages(record)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages] == [turn["value"] for turn in record["conversations"]]
    tokenizer = tokenizer_for(family, template)
    example = build_sft_example(messages, tokenizer, template, 4096)
    text = tokenizer.decode(example["input_ids"])
    assert all(turn["value"] in text for turn in record["conversations"])
    end = end_token(tokenizer, family, template)
    assert [tokenizer.decode(r) for r in supervised_runs(example)] == ["The answer is 4." + end, "Cats and dogs." + end]


@pytest.mark.parametrize("family, template", EVERY_TEMPLATE)
def test_truncation_keeps_the_answer_on_every_template(family, template, tmp_path):
    """Fault 7 (truncation loses the answer): the prompt is cut from the left; the answer stays whole."""
    tokenizer = tokenizer_for(family, template)
    messages = [system("Be brief."), user("Tell me a joke about cats and dogs. " * 6), assistant("The answer is 4.")]
    full = build_sft_example(messages, tokenizer, template, 4096)
    n = len(full["input_ids"]) - 12
    cut = build_sft_example(messages, tokenizer, template, n)
    assert len(cut["input_ids"]) == n and supervised_runs(cut) == supervised_runs(full)
    answer_start = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    assert cut["input_ids"][answer_start - len(full["input_ids"]) :] == full["input_ids"][answer_start:]
    if full["input_ids"][0] == tokenizer.bos_token_id and family != "chatml":
        assert cut["input_ids"][0] == tokenizer.bos_token_id and cut["input_ids"].count(tokenizer.bos_token_id) == 1
    assert build_sft_example(messages, tokenizer, template, n, truncation_strategy="drop") is None

    # in the builder, no example without a supervised token ever reaches training; drops are named
    records = [{"instruction": "Tell me a joke. " * 6, "output": "No."}, {"instruction": "Hi", "output": ""}]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    for strategy, max_length in (("truncate_prompt", 4), ("drop", 12)):
        config = settings(dataset_path=str(path), prompt_template=template, max_seq_length=max_length,
                          truncation_strategy=strategy)
        try:
            data, report = build_sft_dataset_with_report(config, tokenizer)
        except DatasetError as err:  # every record dropped: the error carries the report
            assert "no train examples left" in str(err) and "record 0" in str(err) and "record 1" in str(err)
            continue
        train = report.splits["train"]
        assert train.kept + len(train.dropped) == 2 == train.kept + train.dropped_too_long + train.dropped_no_supervised
        assert all(any(label != IGNORE_INDEX for label in row) for row in data["train"]["labels"])
        assert all(re.match(rf"{re.escape(str(path))}: record [01]: dropped_", line) for line in train.dropped)


# --------------------------------------------------------------------------------------------
# Readers and malformed records
# --------------------------------------------------------------------------------------------


def test_readers_and_auto_detect():
    alpaca = {"instruction": "Add.", "input": "2 and 2", "output": "4"}
    assert detect_format(alpaca) == "alpaca"
    assert to_messages(alpaca) == [
        {"role": "user", "content": "Add.\n\n2 and 2", "instruction": "Add.", "input": "2 and 2"},
        {"role": "assistant", "content": "4"},
    ]
    assert to_messages({"instruction": "Hi", "output": "Yo", "system": "S"})[0] == system("S")
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
        ]
    }
    assert detect_format(sharegpt) == "sharegpt"
    assert to_messages(sharegpt) == [system("S"), user("a"), assistant("b")]
    assert to_messages(
        {"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}, "sharegpt"
    ) == [user("a"), assistant("b")]
    messages = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "label": True}
    assert detect_format(messages) == "messages"
    assert to_messages(messages, "auto") == [user("a"), assistant("b")]
    # a trailing user turn is a record cut short: nothing answers it, nothing trains on it
    trailing = {"messages": messages["messages"] + [{"role": "user", "content": "c"}]}
    with pytest.raises(DatasetError, match="ends with a 'user' turn that nothing answers") as err:
        to_messages(trailing)
    assert err.value.field == "messages[2].role"


MALFORMED = [
    ({"instruction": "x"}, "alpaca", "output", "missing field"),
    ({"instruction": 3, "output": "y"}, "alpaca", "instruction", "expected a string"),
    (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
        "sharegpt",
        "conversations[1].from",
        "unknown role 'bot'",
    ),
    (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "f()"}]},
        "sharegpt",
        "conversations[1].value",
        "not valid JSON",
    ),
    (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "observation", "value": "o"}]},
        "auto",
        "conversations[1].from",
        "a tool result must follow an assistant turn with tool calls",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "tool", "content": "t"},
            ]
        },
        "messages",
        "messages[2].role",
        "a tool result must follow an assistant turn with tool calls",
    ),
    ({"conversations": []}, "sharegpt", "conversations", "empty conversation"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt", "conversations", "no assistant turn"),
    (
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "human", "value": "b"},
                {"from": "gpt", "value": "c"},
            ]
        },
        "sharegpt",
        "conversations[1].from",
        "two consecutive 'user' turns",
    ),
    (
        {"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "c"}]},
        "sharegpt",
        "conversations[0].value",
        "expected a string",
    ),
    (
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "c"}]},
        "sharegpt",
        "conversations[0].value",
        "missing field",
    ),
    (
        {"conversations": [{"from": "gpt", "value": "c"}]},
        "sharegpt",
        "conversations[0].from",
        "must start with a user turn",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "b"},
            ]
        },
        "messages",
        "messages[1].role",
        "only allowed as the first turn",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}]},
                {"role": "assistant", "content": "b"},
            ]
        },
        "messages",
        "messages[0].content",
        "expected a string",
    ),
    ({"messages": "hello"}, "messages", "messages", "expected a list"),
    ({"prompt": "a", "completion": "b"}, "auto", None, "cannot detect the format"),
]


@pytest.mark.parametrize("record, fmt, field, reason", MALFORMED)
def test_malformed_record_error_names_file_index_and_field(tmp_path, record, fmt, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [_valid_like(record), record])  # the bad one is record 1
    with pytest.raises(DatasetError) as info:
        load_messages(path, fmt)
    message = str(info.value)
    assert str(path) in message and "record 1" in message and reason in message
    assert (info.value.source, info.value.index, info.value.field) == (str(path), 1, field)
    if field is not None:
        assert f"field {field!r}" in message


def _valid_like(record):
    if "conversations" in record:
        return {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    if "messages" in record:
        return {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    return {"instruction": "a", "output": "b"}


def test_all_malformed_records_reported_at_once(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"instruction": "a"}, {"instruction": "b", "output": "c"}, {"output": "d"}]
    )
    with pytest.raises(DatasetError, match=r"bad\.jsonl: 2 malformed records") as info:
        load_messages(path, "alpaca")
    assert "record 0: field 'output'" in str(info.value) and "record 2: field 'instruction'" in str(info.value)
    assert [(p.index, p.field) for p in info.value.problems] == [(0, "output"), (2, "instruction")]


def test_to_messages_rejects_unknown_format_and_non_objects():
    with pytest.raises(ValueError, match="unknown dataset format"):
        to_messages({"instruction": "a", "output": "b"}, "openai")
    with pytest.raises(DatasetError, match="f.json: record 4: expected a JSON object"):
        to_messages(["a"], source="f.json", index=4)


GLAIVE_LIKE = {  # a function-calling record in ShareGPT form (roles as LLaMA-Factory's glaive demo uses them)
    "conversations": [
        {"from": "system", "value": "You can call get_time()."},
        {"from": "human", "value": "What time is it?"},
        {"from": "function_call", "value": '{"name": "get_time"}'},
        {"from": "observation", "value": '{"time": "12:00"}'},
        {"from": "gpt", "value": "It is noon."},
    ]
}


def test_unknown_role_error_names_the_role_the_record_and_the_setting(tmp_path):
    bot = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}
    path = write_jsonl(tmp_path / "calls.jsonl", [CHAT_RECORDS[0], bot])
    with pytest.raises(DatasetError) as info:
        load_messages(path)
    assert (info.value.index, info.value.field) == (1, "conversations[1].from")
    assert "record 1" in str(info.value) and "unknown role 'bot'" in str(info.value)
    assert "role_map" in str(info.value)


def test_role_map_maps_extra_roles_and_keeps_every_turn(tmp_path):
    role_map = parse_role_map(["function_call:assistant", "observation:user"])
    messages = to_messages(GLAIVE_LIKE, role_map=role_map)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages] == [t["value"] for t in GLAIVE_LIKE["conversations"]]
    tool = {"messages": [user("a"), assistant("call"), {"role": "tool", "content": "42"}, assistant("b")]}
    assert to_messages(tool, role_map={"tool": "user"})[2] == user("42")
    # through the settings, for every split
    path = write_jsonl(tmp_path / "calls.jsonl", [GLAIVE_LIKE])
    config = settings(dataset_path=str(path), role_map=["function_call:assistant", "observation:user"])
    assert load_splits(config)["train"] == [messages]
    # consecutive same-role turns after mapping follow the documented rule: rejected, never merged or dropped
    with pytest.raises(DatasetError, match=r"record 0: field 'conversations\[3\]\.from': two consecutive 'assistant'"):
        load_messages(path, role_map={"function_call": "assistant", "observation": "assistant"})
    with pytest.raises(ValueError, match="role_map entry 'tool:bot'"):
        parse_role_map(["tool:bot"])


def test_sharegpt_roles_come_from_the_from_field_not_positions():
    # a positional reader would call these user / assistant / user and accept them
    record = {"conversations": [{"from": f, "value": v} for f, v in (("gpt", "a"), ("human", "b"), ("gpt", "c"))]}
    with pytest.raises(DatasetError, match="must start with a user turn"):
        to_messages(record)
    record = {"conversations": [{"from": f, "value": v} for f, v in (("human", "a"), ("system", "s"), ("gpt", "c"))]}
    with pytest.raises(DatasetError, match="system turn is only allowed as the first"):
        to_messages(record)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

CHAT_RECORDS = [
    {"conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi."}]},
    {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
        ]
    },
]
EXPECTED_CHAT = [[user("Hello!"), assistant("Hi.")], [system("S"), user("a"), assistant("b")]]


def test_load_json_list_single_object_and_jsonl(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(CHAT_RECORDS))
    assert load_messages(tmp_path / "list.json") == EXPECTED_CHAT
    (tmp_path / "one.json").write_text(json.dumps(CHAT_RECORDS[1], indent=2))
    assert load_records(tmp_path / "one.json") == [CHAT_RECORDS[1]]
    (tmp_path / "data.jsonl").write_text(json.dumps(CHAT_RECORDS[0]) + "\n\n" + json.dumps(CHAT_RECORDS[1]) + "\n")
    assert load_messages(tmp_path / "data.jsonl") == EXPECTED_CHAT


def test_load_parquet_and_csv(tmp_path):
    pq.write_table(pa.Table.from_pylist(CHAT_RECORDS), tmp_path / "chat.parquet")
    assert load_messages(tmp_path / "chat.parquet") == EXPECTED_CHAT
    (tmp_path / "alpaca.csv").write_text('instruction,input,output\nAdd.,2 and 2,4\n"Say hi, please.",,"Hi,\nthere"\n')
    assert load_messages(tmp_path / "alpaca.csv") == [
        [user("Add.\n\n2 and 2", instruction="Add.", input="2 and 2"), assistant("4")],
        [user("Say hi, please.", instruction="Say hi, please.", input=""), assistant("Hi,\nthere")],
    ]


def test_bad_files_raise_with_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": }\n')
    with pytest.raises(DatasetError, match=r"broken\.jsonl: invalid JSON on line 3"):
        load_records(path)
    (tmp_path / "broken.json").write_text('[{"a": 1},\n{"a": }]')
    with pytest.raises(DatasetError, match=r"broken\.json: invalid JSON at line 2"):
        load_records(tmp_path / "broken.json")
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DatasetError, match="unsupported file type '.txt'"):
        load_records(tmp_path / "data.txt")
    with pytest.raises(DatasetError, match=r"\./missing\.jsonl: no such local file"):
        load_records("./missing.jsonl")


def test_hub_names_go_to_datasets_and_fail_clearly_offline(monkeypatch):
    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DatasetError,
        match=r"'someone/some-data' is neither an existing local file nor .* reachable on the Hugging Face Hub",
    ):
        load_records("someone/some-data")
    calls = []

    def online(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(CHAT_RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", online)
    assert load_messages("someone/some-data") == EXPECTED_CHAT and calls == [("someone/some-data", "train")]


# --------------------------------------------------------------------------------------------
# Splits and the dataset builder
# --------------------------------------------------------------------------------------------


def test_split_records_by_fraction_and_count():
    items = list(range(20))
    train, held_out = split_records(items, 0.2, seed=0)
    assert len(held_out) == 4 and sorted(train + held_out) == items and not set(train) & set(held_out)
    assert train == sorted(train) and held_out == sorted(held_out)  # original order kept
    assert split_records(items, 0.2, seed=0) == (train, held_out)
    assert split_records(items, 0.2, seed=1)[1] != held_out
    assert len(split_records(items, 3, seed=0)[1]) == 3
    assert len(split_records(items, 0.01, seed=0)[1]) == 1  # at least one
    assert split_records(items, 0, seed=0) == (items, [])
    with pytest.raises(ValueError):
        split_records(items, 1.5, seed=0)
    with pytest.raises(DatasetError, match="leaving none to train on"):
        split_records(items, 20, seed=0)


def test_build_dataset_with_eval_fraction(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_records(10))
    tokenizer = make_tokenizer("chatml")
    data = build_sft_dataset(settings(dataset_path=str(path), eval_split_size=0.3, seed=3), tokenizer)
    assert set(data) == {"train", "eval"} and (data["train"].num_rows, data["eval"].num_rows) == (7, 3)
    assert data["train"].column_names == ["input_ids", "attention_mask", "labels"]
    splits = load_splits(settings(dataset_path=str(path), eval_split_size=0.3, seed=3))
    eval_answers = sorted(held_out_prompt(m)[1] for m in splits["eval"])
    built_answers = sorted(tokenizer.decode(supervised_runs(row)[0]).removesuffix("<|im_end|>") for row in data["eval"])
    assert built_answers == eval_answers  # the held-out messages are exactly what the eval split holds
    assert "eval" not in build_sft_dataset(settings(dataset_path=str(path)), tokenizer)


def test_build_dataset_with_eval_file_and_system_prompt(tmp_path, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_records(4))
    held = write_jsonl(tmp_path / "eval.jsonl", CHAT_RECORDS)
    config = settings(
        dataset_path=str(train), eval_dataset_path=str(held), eval_split_size=0.5, system_prompt="Be nice."
    )
    splits = load_splits(config)
    assert len(splits["train"]) == 4 and len(splits["eval"]) == 2  # the eval file wins, no split
    assert splits["train"][0][0] == system("Be nice.")
    assert splits["eval"][1][0] == system("S")  # a conversation's own system turn is kept
    with caplog.at_level(logging.INFO, logger="data.dataset"):
        data = build_sft_dataset(config, make_tokenizer("chatml"))
    assert (data["train"].num_rows, data["eval"].num_rows) == (4, 2)
    assert "SFT data: template=chatml" in caplog.text and "dropped_no_supervised" in caplog.text
    prompt, answer = held_out_prompt(splits["eval"][0])
    assert (prompt, answer) == ([system("Be nice."), user("Hello!")], "Hi.")


def test_settings_are_validated_at_once(tmp_path):
    bad = settings(dataset_path="x", dataset_format="yaml", truncation_strategy="keep_end", prompt_template="llama3")
    with pytest.raises(ValueError) as info:
        build_sft_dataset(bad, make_tokenizer("chatml"))
    message = str(info.value)
    assert "dataset_format='yaml'" in message and "truncation_strategy='keep_end'" in message and "'llama3'" in message


# --------------------------------------------------------------------------------------------
# Real data files from ../shared
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
@pytest.mark.parametrize(
    "relative, records",
    [
        ("datasets/llamafactory/alpaca_en_demo.json", 999),
        ("datasets/axolotl/conversation.sharegpt.json", 1),
        ("datasets/llamafactory/kto_en_demo.json", 300),
        ("datasets/axolotl/alpaca.json", 2),
    ],
)
def test_real_files_build_or_are_reported(relative, records, template):
    path = shared_file(relative)
    tokenizer = make_tokenizer("chatml")
    # the tiny tokenizer writes most text byte by byte: 4096 tokens hold every answer of these files
    config = settings(dataset_path=str(path), prompt_template=template, max_seq_length=4096)
    data, report = build_sft_dataset_with_report(config, tokenizer)
    train = report.splits["train"]
    assert train.records == records
    assert train.kept + train.dropped_too_long + train.dropped_no_supervised == records
    assert data["train"].num_rows == train.kept > 0 and train.length_max <= 4096
    assert 0 < train.supervised_tokens <= train.total_tokens


def test_real_alpaca_file_with_alpaca_template():
    path = shared_file("datasets/llamafactory/alpaca_en_demo.json")
    prompt_input, prompt_no_input = parse_alpaca_reference()
    tokenizer = make_tokenizer("llama3")
    for record in json.loads(path.read_text())[:50]:
        prompt = prompt_input if record["input"] != "" else prompt_no_input
        text = render(to_messages(record), "alpaca", tokenizer)
        assert text == prompt.format_map(record) + record["output"] + "<|end_of_text|>"


REAL_FILES = [
    ("datasets/llamafactory/alpaca_en_demo.json", 999),
    ("datasets/axolotl/conversation.sharegpt.json", 1),
    ("datasets/llamafactory/kto_en_demo.json", 300),
]


@pytest.fixture(scope="module")
def default_tokenizer():
    """The default model's tokenizer (SmolLM2-135M-Instruct; offline copy when the hub is unreachable)."""
    from config import get_settings
    from models import load_tokenizer

    return load_tokenizer(get_settings([], env_file=None))


@pytest.mark.slow  # loads the default model's tokenizer (~3 s) and builds 1300 records twice
@pytest.mark.parametrize("template", ["alpaca", "tokenizer"])
@pytest.mark.parametrize("relative, records", REAL_FILES)
def test_real_files_with_the_default_tokenizer_build_or_are_reported(relative, records, template, default_tokenizer):
    path = shared_file(relative)
    config = settings(dataset_path=str(path), prompt_template=template, max_seq_length=512)
    data, report = build_sft_dataset_with_report(config, default_tokenizer)
    train = report.splits["train"]
    assert train.records == records == train.kept + len(train.dropped)
    assert all(line.startswith(f"{path}: record ") for line in train.dropped)  # each drop named with its reason
    assert all(any(label != IGNORE_INDEX for label in labels) for labels in data["train"]["labels"])
    assert train.length_max <= 512 and 0 < train.supervised_tokens < train.total_tokens
    # alpaca ends answers with eos, SmolLM2's template with <|im_end|>: the same token. Only an answer
    # longer than max_seq_length on its own loses its end (the documented truncation rule).
    rows = data["train"].select(range(min(50, train.kept)))
    whole = [row for row in rows if len(row["input_ids"]) < 512]
    assert all(default_tokenizer.decode(supervised_runs(row)[-1]).endswith("<|im_end|>") for row in whole)
    assert re.search(rf"^train\s+{records}\s+{train.kept}\s+{train.truncated}\s", report.format().splitlines()[2])


def test_real_file_report_with_packing_shows_efficiency():
    path = shared_file("datasets/llamafactory/alpaca_en_demo.json")
    config = settings(dataset_path=str(path), max_seq_length=512, packing=True)
    _, report = build_sft_dataset_with_report(config, make_tokenizer("chatml"))
    train = report.splits["train"]
    assert train.kept + train.dropped_too_long == 999 and 0 < train.packed_rows < train.kept
    assert train.packing_efficiency == pytest.approx(train.total_tokens / (train.packed_rows * 512))
    assert train.packing_efficiency > 0.9  # best-fit decreasing fills rows well on this length mix
    assert "packing_efficiency" in report.format()
