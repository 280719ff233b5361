"""Per-message `weight` (OpenAI chat fine-tuning format): 0 = context only, 1 = trained; and the keys
a reader does not read are counted in the dataset report, never dropped unseen."""

from __future__ import annotations

import pytest

from data.dataset import build_sft_dataset_with_report
from data.errors import DatasetError
from data.examples import IGNORE_INDEX, build_sft_example
from data.readers import load_messages, read_record, to_messages
from tests.test_dataset import (
    EVERY_TEMPLATE,
    assistant,
    end_token,
    settings,
    supervised_runs,
    system,
    tokenizer_for,
    user,
    write_jsonl,
)
from tests.tiny import make_tokenizer

CONTEXT_ANSWER = {"role": "assistant", "content": "Cats and dogs.", "weight": 0}
MESSAGES = [system("Be brief."), user("Tell me a joke."), CONTEXT_ANSWER, user("Another?"), assistant("No.")]


@pytest.mark.parametrize("family, template", EVERY_TEMPLATE)
def test_weight_0_turn_is_context_on_every_template(family, template):
    tokenizer = tokenizer_for(family, template)
    example = build_sft_example(MESSAGES, tokenizer, template, 4096)
    assert [tokenizer.decode(run) for run in supervised_runs(example)] == ["No." + end_token(tokenizer, family, template)]
    unweighted = [{k: v for k, v in m.items() if k != "weight"} for m in MESSAGES]
    trained = build_sft_example(unweighted, tokenizer, template, 4096)
    assert example["input_ids"] == trained["input_ids"]  # rendered the same: only the labels differ
    assert len(supervised_runs(trained)) == 2
    weight_1 = [dict(m, weight=1) if m["role"] == "assistant" else m for m in MESSAGES]
    assert build_sft_example(weight_1, tokenizer, template, 4096) == trained


def test_readers_keep_the_weight_of_messages_and_sharegpt_turns():
    record = {"messages": [user("a"), CONTEXT_ANSWER, user("b"), {"role": "assistant", "content": "c", "weight": 1}]}
    assert to_messages(record)[1:] == [CONTEXT_ANSWER, user("b"), {"role": "assistant", "content": "c", "weight": 1}]
    sharegpt = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b", "weight": 0}]}
    assert to_messages(sharegpt) == [user("a"), {"role": "assistant", "content": "b", "weight": 0}]


@pytest.mark.parametrize(
    "turn, reason",
    [
        ({"role": "assistant", "content": "b", "weight": 0.5}, r"weight must be 0 \(context only, not trained\) or 1"),
        ({"role": "assistant", "content": "b", "weight": "0"}, "got '0'"),
        ({"role": "assistant", "content": "b", "weight": True}, "got True"),
        ({"role": "assistant", "content": "b", "weight": None}, "got None"),
    ],
)
def test_a_weight_other_than_0_or_1_names_record_and_field(tmp_path, turn, reason):
    good = {"messages": [user("a"), assistant("b")]}
    path = write_jsonl(tmp_path / "w.jsonl", [good, {"messages": [user("a"), turn]}])
    with pytest.raises(DatasetError, match=reason) as info:
        load_messages(path)
    assert (info.value.index, info.value.field) == (1, "messages[1].weight")
    assert f"{path}: record 1: field 'messages[1].weight'" in str(info.value)


def test_a_weight_on_a_user_turn_is_rejected():
    with pytest.raises(DatasetError, match="only read on assistant turns, this one is 'user'") as info:
        to_messages({"conversations": [{"from": "human", "value": "a", "weight": 0}, {"from": "gpt", "value": "b"}]})
    assert info.value.field == "conversations[0].weight"


def test_report_counts_supervised_tokens_with_weights_and_lists_unread_keys(tmp_path):
    tokenizer = make_tokenizer("chatml")
    records = [
        {"messages": MESSAGES[1:], "label": True, "id": 1},
        {"messages": [user("Hi"), {"role": "assistant", "content": "Yo", "name": "bot"}], "id": 2},
        {"conversations": [{"from": "human", "value": "Hi", "markdown": "x"}, {"from": "gpt", "value": "Yo"}]},
        {"instruction": "Hi", "output": "Yo", "history": []},
    ]
    path = write_jsonl(tmp_path / "w.jsonl", records)
    data, report = build_sft_dataset_with_report(settings(dataset_path=str(path)), tokenizer)
    train = report.splits["train"]
    no_weights = [dict(records[0], messages=[{k: v for k, v in m.items() if k != "weight"} for m in MESSAGES[1:]])] + records[1:]
    _, unweighted = build_sft_dataset_with_report(
        settings(dataset_path=str(write_jsonl(tmp_path / "u.jsonl", no_weights))), tokenizer
    )
    context = len(tokenizer.encode("Cats and dogs.<|im_end|>", add_special_tokens=False))
    assert train.supervised_tokens == unweighted.splits["train"].supervised_tokens - context
    assert train.supervised_tokens == sum(sum(x != IGNORE_INDEX for x in row) for row in data["train"]["labels"])
    assert train.ignored_keys == {"label": 1, "id": 2, "messages[].name": 1, "conversations[].markdown": 1, "history": 1}
    lines = [line for line in report.format().splitlines() if "not read" in line]
    assert lines == [
        "not read in train (ignored): 'label' (1 records), 'id' (2 records), 'messages[].name' (1 records), "
        "'conversations[].markdown' (1 records), 'history' (1 records)"
    ]


def test_read_record_names_each_unread_key_once():
    record = {"messages": [user("a"), {"role": "assistant", "content": "b", "name": "x"}, user("c"),
                           {"role": "assistant", "content": "d"}], "label": 0}
    record["messages"][2]["name"] = "y"
    conversation = read_record(record, index=7)
    assert conversation.ignored_keys == ("label", "messages[].name") and conversation.index == 7
