"""Data errors that point at the fix: every unknown role at once with the right ROLE_MAP, a wrong
mapping named as such, missing template tokens with their fixes, warnings for empty and unfilled
answers, and one printable block per error."""

from __future__ import annotations

import pytest

from data.dataset import build_sft_dataset_with_report
from data.errors import DatasetError, suggest_role
from data.readers import load_conversations, read_record, to_messages
from data.templates import check_template_tokens
from tests.test_dataset import settings, write_jsonl
from tests.tiny import make_tokenizer


def turns(*pairs):
    return {"conversations": [{"from": who, "value": text} for who, text in pairs]}


def test_every_unknown_role_of_a_record_is_named_at_once_with_a_role_map_for_all():
    record = turns(("human", "Hi"), ("bot", "Hello"), ("narrator", "Later..."), ("human", "Bye"), ("bot", "Bye"))
    with pytest.raises(DatasetError) as info:
        to_messages(record, source="chats.jsonl", index=4)
    err = info.value
    assert err.reason.startswith(
        "unknown roles 'bot' (conversations[1].from, conversations[4].from), 'narrator' (conversations[2].from); known: "
    )
    assert (err.index, err.field, err.roles) == (4, "conversations[1].from", {"bot": "assistant", "narrator": None})
    assert err.hint == (
        "map the unknown roles with ROLE_MAP=bot:assistant,narrator:user (or the --role_map flag); targets: "
        "system, user, assistant, tool, function_call; check 'narrator': user or assistant, as the turns are"
    )


@pytest.mark.parametrize(
    "name, target",
    [("model", "assistant"), ("bot", "assistant"), ("developer", "system"), ("tool_call", "function_call"),
     ("tool_response", "tool"), ("function", "tool"), ("ipython", "tool"), ("Human ", "user"), ("narrator", None)],
)
def test_suggested_targets(name, target):
    assert suggest_role(name) == target


def test_the_suggested_mapping_reads_the_data_right():
    """function_call / observation need no mapping; a tool_call / tool_response dialect maps to
    function_call / tool as suggested, and reads as the same tool call."""
    call = '{"name": "find_book", "arguments": {"title": "Dune"}}'
    native = turns(("human", "Dune?"), ("function_call", call), ("observation", "B12"), ("gpt", "Shelf B12."))
    dialect = turns(("human", "Dune?"), ("tool_call", call), ("tool_response", "B12"), ("gpt", "Shelf B12."))
    with pytest.raises(DatasetError) as info:
        read_record(dialect)
    suggested = info.value.roles
    assert suggested == {"tool_call": "function_call", "tool_response": "tool"}
    assert read_record(dialect, role_map=suggested).messages == read_record(native).messages
    assert read_record(native).messages[1]["tool_calls"][0]["function"]["name"] == "find_book"


def test_unknown_roles_across_records_give_one_role_map_and_one_block(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [
        turns(("human", "a"), ("gpt", "b")),
        turns(("human", "a"), ("bot", "b")),
        turns(("user", "a"), ("model", "b")),
    ])
    with pytest.raises(DatasetError) as info:
        load_conversations(path)
    block = info.value.format_block()
    assert block.splitlines() == [
        f"data error in {path}: 2 malformed records",
        "  record 1, field 'conversations[1].from': unknown role 'bot' (conversations[1].from); known: assistant, "
        "function_call, gpt, human, observation, system, tool, user",
        "  record 2, field 'conversations[1].from': unknown role 'model' (conversations[1].from); known: assistant, "
        "function_call, gpt, human, observation, system, tool, user",
        "fix: map the unknown roles with ROLE_MAP=bot:assistant,model:assistant (or the --role_map flag); targets: "
        "system, user, assistant, tool, function_call",
    ]
    assert "fix: map the unknown roles with ROLE_MAP=bot:assistant,model:assistant" in str(info.value)
    assert "Traceback" not in block


def test_a_wrong_mapping_is_named_not_the_data():
    record = turns(("human", "Dune?"), ("tool_call", '{"name": "f"}'), ("tool_response", "B12"), ("gpt", "Shelf B12."))
    with pytest.raises(DatasetError) as info:
        read_record(record, role_map={"tool_call": "function_call", "tool_response": "assistant"})
    err = info.value
    assert err.field == "conversations[2].from"
    assert err.reason == (
        "two consecutive 'assistant' turns (1 and 2); merge them in the data (turn 1 is 'tool_call', which "
        "role_map maps to 'function_call', turn 2 is 'tool_response', which role_map maps to 'assistant')"
    )
    assert err.hint == (
        "check the mapping ROLE_MAP=tool_call:function_call,tool_response:assistant: the turns it maps break the "
        "turn order"
    )
    assert err.format_block().splitlines()[-1] == f"fix: {err.hint}"


@pytest.mark.parametrize("template, family, usable", [("llama3", "chatml", "alpaca or chatml"), ("phi3", "llama3", "alpaca or llama3")])
def test_template_tokens_missing_say_how_to_fix(template, family, usable):
    with pytest.raises(ValueError) as info:
        check_template_tokens(template, make_tokenizer(family))
    message = str(info.value)
    assert f"Fix: use PROMPT_TEMPLATE={usable}, whose tokens this tokenizer has" in message
    assert "tokenizer.add_special_tokens({'additional_special_tokens': [" in message
    assert "techniques.lora.resize_token_embeddings(model, tokenizer)" in message
    official = make_tokenizer(family)
    official.chat_template = "{{ 'x' }}"
    with pytest.raises(ValueError, match=r"PROMPT_TEMPLATE=alpaca or \w+ or tokenizer, whose tokens .* own chat template"):
        check_template_tokens(template, official)


def test_report_warns_about_empty_and_unfilled_answers_with_record_indices(tmp_path):
    records = [
        {"instruction": "Hi", "output": "Hello"},
        {"instruction": "Hi", "output": "  "},
        {"instruction": "Greet the user", "output": "Hello {{name}}, welcome to {{ place }}!"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                      {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
        {"messages": [{"role": "user", "content": "{{question}}"}, {"role": "assistant", "content": "fine"}]},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    _, report = build_sft_dataset_with_report(settings(dataset_path=str(path)), make_tokenizer("chatml"))
    train = report.splits["train"]
    assert (train.empty_answers, train.placeholder_answers) == ([1, 3], [2])  # a placeholder in a prompt is fine
    assert report.format().splitlines()[-2:] == [
        "warning: train: 2 records with an empty answer (trained to answer nothing): records 1, 3",
        "warning: train: 1 records with an answer still holding a template placeholder like {{name}}: records 2",
    ]


def test_format_block_of_a_single_error():
    err = DatasetError("weight must be 0 (context only, not trained) or 1 (trained), got 2", source="d.jsonl",
                       index=3, field="messages[1].weight")
    assert err.format_block() == (
        "data error in d.jsonl\n  record 3, field 'messages[1].weight': weight must be 0 (context only, not trained) "
        "or 1 (trained), got 2"
    )
    assert str(err) == "d.jsonl: record 3: field 'messages[1].weight': weight must be 0 (context only, not trained) or 1 (trained), got 2"
