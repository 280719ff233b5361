"""Tool calling end to end: readers (ShareGPT function_call/observation + tools, OpenAI tool_calls +
role tool), rendering per template (parity with Qwen2.5 and Llama 3.1), masks (calls trained with their
turn end, tool lists and results never), the saved chat template (same ids), and reading calls back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data.chat_templates import chat_template_for
from data.dataset import build_sft_dataset_with_report
from data.errors import DatasetError
from data.examples import build_sft_example, encode_prompt
from data.readers import load_conversations, read_record, read_tools
from data.templates import render
from data.tools import hermes_answer, llama31_call, parse_tool_calls
from tests.test_dataset import official_tokenizer, settings, shared_file, supervised_runs
from tests.test_saved_chat_template import SYSTEM_PROMPT, with_system
from tests.tiny import make_tokenizer

FIND_BOOK = {
    "name": "find_book",
    "description": "Find a book in the library by title.",
    "parameters": {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]},
}
SET_TIMER = {
    "name": "set_timer",
    "description": "Start a kitchen timer.",
    "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}}, "required": ["minutes"]},
}
TOOLS = [{"type": "function", "function": FIND_BOOK}, {"type": "function", "function": SET_TIMER}]


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def answer(text, *calls):
    return {"role": "assistant", "content": text, **({"tool_calls": list(calls)} if calls else {})}


def result(text):
    return {"role": "tool", "content": text}


GLAIVE_RECORD = {  # ShareGPT as glaive / LLaMA-Factory write it: tools as a JSON string
    "conversations": [
        {"from": "human", "value": "Where is Dune?"},
        {"from": "function_call", "value": '{"name": "find_book", "arguments": {"title": "Dune"}}'},
        {"from": "observation", "value": '{"shelf": "B12"}'},
        {"from": "gpt", "value": "Dune is on shelf B12."},
    ],
    "system": "You are the library assistant.",
    "tools": json.dumps([FIND_BOOK, SET_TIMER]),
}
OPENAI_RECORD = {  # OpenAI chat fine-tuning format: arguments as a JSON string, content null beside calls
    "messages": [
        {"role": "system", "content": "You are the library assistant."},
        {"role": "user", "content": "Where is Dune?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "find_book", "arguments": '{"title": "Dune"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"shelf": "B12"}'},
        {"role": "assistant", "content": "Dune is on shelf B12."},
    ],
    "tools": TOOLS,
}
CALL_AND_ANSWER = [
    system("You are the library assistant."), user("Where is Dune?"), answer("", call("find_book", title="Dune")),
    result('{"shelf": "B12"}'), answer("Dune is on shelf B12."),
]
CONVERSATIONS = {  # name -> messages; every one is rendered with TOOLS
    "call_and_answer": CALL_AND_ANSWER,
    "no_system": CALL_AND_ANSWER[1:],
    "no_call": [user("What is a library?"), answer("A building full of books.")],
    "two_exchanges": CALL_AND_ANSWER + [
        user("Set a timer for 5 minutes."), answer("", call("set_timer", minutes=5)), result('{"ok": true}'),
        answer("Done."),
    ],
    "parallel_calls": [  # not in Llama 3.1's format (one call per turn)
        user("Find Dune and Emma."), answer("", call("find_book", title="Dune"), call("find_book", title="Emma")),
        result('{"shelf": "B12"}'), result('{"shelf": "C3"}'), answer("B12 and C3."),
    ],
    "text_and_call": [user("Where is Dune?"), answer("Let me look.", call("find_book", title="Dune"))],  # Hermes only
}
HERMES_ONLY = ("parallel_calls", "text_and_call")

# (tokenizer family, template, the family's own chat template when `template` is "tokenizer")
CASES = [
    ("chatml", "alpaca", None), ("llama3", "alpaca", None), ("qwen", "alpaca", None),
    ("chatml", "chatml", None), ("qwen", "chatml", None), ("phi3", "phi3", None), ("llama3", "llama3", None),
    ("qwen", "tokenizer", "qwen2.5-instruct.jinja"), ("llama3", "tokenizer", "llama-3.1-instruct.jinja"),
]
TURN_END = {"alpaca": None, "chatml": "<|im_end|>", "phi3": "<|end|>", "llama3": "<|eot_id|>"}


def tokenizer_for(family, template, own):
    tokenizer = make_tokenizer(family)
    if own:
        tokenizer.chat_template = shared_file(f"reference/templates/{own}").read_text()
    return tokenizer


def expected_supervised(messages, template, family, tokenizer) -> list[str]:
    """Each trained assistant turn as text: Hermes (or Llama 3.1 JSON) content/calls + the turn end."""
    llama = template == "llama3" or (template == "tokenizer" and family == "llama3")
    end = tokenizer.eos_token if template == "alpaca" else "<|eot_id|>" if llama else TURN_END.get(template, "<|im_end|>")
    texts = []
    for m in messages:
        if m["role"] == "assistant":
            body = (llama31_call(m) if m.get("tool_calls") else m["content"]) if llama else hermes_answer(m)
            texts.append(body + end)
    return texts


# ---------------------------------------------------------------- readers


def test_sharegpt_function_call_and_openai_tool_calls_read_to_the_same_conversation():
    glaive, openai = read_record(GLAIVE_RECORD), read_record(OPENAI_RECORD)
    assert glaive.tools == openai.tools == TOOLS  # bare schemas are wrapped as OpenAI tools
    assert glaive.messages == CALL_AND_ANSWER  # function_call -> tool_calls, observation -> tool
    ids = {"tool_calls": [dict(call("find_book", title="Dune"), id="call_1")]}
    assert openai.messages == CALL_AND_ANSWER[:2] + [answer("", **{})  | ids, result('{"shelf": "B12"}') | {
        "tool_call_id": "call_1"}, CALL_AND_ANSWER[4]]
    assert glaive.ignored_keys == openai.ignored_keys == ()  # system, tools, tool_call_id are read


def test_a_list_of_calls_in_one_function_call_turn_is_kept_in_order():
    value = json.dumps([{"name": "find_book", "arguments": {"title": "Dune"}}, {"name": "set_timer", "arguments": "{}"}])
    record = {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": value}]}
    assert read_record(record).messages[1]["tool_calls"] == [call("find_book", title="Dune"), call("set_timer")]


@pytest.mark.parametrize(
    "record, field, reason",
    [
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": '{"name": 3}'}]},
         "conversations[1].value", "expected a tool call"),
        ({"messages": [user("a"), {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "f", "arguments": "{bad"}}]}]}, "messages[1].tool_calls[0].arguments", "not valid JSON"),
        ({"messages": [user("a"), {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "f", "arguments": "[1]"}}]}]}, "messages[1].tool_calls[0]", "must be a JSON object"),
        ({"messages": [{"role": "user", "content": "a", "tool_calls": [call("f")]}, answer("b")]},
         "messages[0].tool_calls", "only assistant turns call tools"),
        ({"messages": [user("a"), answer("", call("f")), result("r"), user("b"), answer("c")]},
         "messages[3].role", "tool results must be followed by the assistant's turn, not 'user'"),
        ({"messages": [user("a"), answer("b")], "tools": "not json"}, "tools", "not valid JSON"),
        ({"messages": [user("a"), answer("b")], "tools": [{"description": "no name"}]}, "tools[0]", "function schema"),
        ({"messages": [user("a"), answer("b")], "tools": {"name": "f"}}, "tools", "expected a list"),
    ],
)
def test_malformed_tool_data_names_record_and_field(tmp_path, record, field, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [user("ok"), answer("ok")]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DatasetError, match=reason) as info:
        load_conversations(path)
    assert (info.value.index, info.value.field) == (1, field)


def test_read_tools_accepts_the_ecosystems_forms():
    assert read_tools(json.dumps([FIND_BOOK])) == read_tools([FIND_BOOK]) == read_tools([TOOLS[0]]) == TOOLS[:1]
    assert read_tools([]) is None and read_tools("") is None and read_tools(None) is None


# ---------------------------------------------------------------- rendering: published formats


def test_chatml_with_tools_is_byte_identical_to_qwen25():
    tokenizer = official_tokenizer_for("qwen", "qwen2.5-instruct.jinja")
    for name, messages in CONVERSATIONS.items():
        if messages[0]["role"] != "system":
            messages = [system("Be brief.")] + messages  # without one, Qwen writes its own default system text
        for gen in (False, True):
            prompt = messages[:-1] if gen else messages
            expected = tokenizer.apply_chat_template(prompt, tools=TOOLS, tokenize=False, add_generation_prompt=gen)
            assert render(prompt, "chatml", tokenizer, gen, tools=TOOLS) == expected, name


def test_llama3_with_tools_is_byte_identical_to_llama31():
    tokenizer = official_tokenizer_for("llama3", "llama-3.1-instruct.jinja")
    for name, messages in CONVERSATIONS.items():
        if name in HERMES_ONLY:
            with pytest.raises(ValueError, match="one call per assistant turn, with no text beside it"):
                render(messages, "llama3", tokenizer, tools=TOOLS)
            continue
        for gen in (False, True):
            prompt = messages[:-1] if gen else messages
            expected = tokenizer.apply_chat_template(prompt, tools=TOOLS, tokenize=False, add_generation_prompt=gen)
            assert render(prompt, "llama3", tokenizer, gen, tools=TOOLS) == expected, name
    # tool turns without a tool list take the 3.1 layout too (its date lines, no "Environment: ipython")
    messages = CONVERSATIONS["no_system"]
    assert render(messages, "llama3", tokenizer) == tokenizer.apply_chat_template(messages, tokenize=False)


def official_tokenizer_for(family, template_file):
    tokenizer = make_tokenizer(family)
    tokenizer.chat_template = shared_file(f"reference/templates/{template_file}").read_text()
    return tokenizer


def test_a_model_template_that_drops_tools_is_refused_with_the_fix():
    smollm2 = official_tokenizer_for("chatml", "smollm2-instruct.jinja")  # no `tools`, no tool_calls
    with pytest.raises(ValueError, match=r"does not write the tool list or tool calls .*'find_book'.*PROMPT_TEMPLATE=chatml"):
        build_sft_example(CALL_AND_ANSWER, smollm2, "tokenizer", 4096, tools=TOOLS)
    phi3 = official_tokenizer("phi3")
    with pytest.raises(ValueError, match="does not write the tool list"):
        render(CONVERSATIONS["no_call"], "tokenizer", phi3, tools=TOOLS)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family, template, own", CASES)
def test_calls_are_trained_with_their_turn_end_and_tool_lists_and_results_never(family, template, own, name):
    tokenizer = tokenizer_for(family, template, own)
    messages = CONVERSATIONS[name]
    if name in HERMES_ONLY and (template == "llama3" or own == "llama-3.1-instruct.jinja"):
        pytest.skip("Llama 3.1 writes one call per turn and no text beside it (tested above)")
    example = build_sft_example(messages, tokenizer, template, 8192, tools=TOOLS)
    runs = [tokenizer.decode(run) for run in supervised_runs(example)]
    assert runs == expected_supervised(messages, template, family, tokenizer)
    supervised = "".join(runs)
    assert "Find a book in the library" not in supervised and '"shelf"' not in supervised and '"ok"' not in supervised
    text = tokenizer.decode(example["input_ids"])
    llama = "<|eot_id|>" in text  # Llama 3.1 writes each result as JSON, so a string result is quoted
    results = [json.dumps(m["content"]) if llama else m["content"] for m in messages if m["role"] == "tool"]
    assert "Find a book in the library" in text and all(r in text for r in results)


# ---------------------------------------------------------------- the saved chat template: same ids


@pytest.mark.parametrize("system_prompt", [None, SYSTEM_PROMPT], ids=["no_system_prompt", "system_prompt"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family, template, own", CASES)
def test_saved_template_gives_the_training_ids_with_tools(family, template, own, name, system_prompt, tmp_path):
    if name in HERMES_ONLY and (template == "llama3" or own == "llama-3.1-instruct.jinja"):
        pytest.skip("Llama 3.1 writes one call per turn and no text beside it")
    tokenizer = tokenizer_for(family, template, own)
    saved = tokenizer_for(family, template, own)
    saved.chat_template = chat_template_for(template, saved, system_prompt)
    saved.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATIONS[name]
    ids = build_sft_example(with_system(messages, system_prompt), tokenizer, template, 8192, tools=TOOLS)["input_ids"]
    assert saved.apply_chat_template(messages, tools=TOOLS, tokenize=True)["input_ids"] == ids
    for end in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
        prompt = encode_prompt(with_system(messages[:end], system_prompt), template, tokenizer, tools=TOOLS)
        served = saved.apply_chat_template(messages[:end], tools=TOOLS, tokenize=True, add_generation_prompt=True)
        assert served["input_ids"] == prompt


def test_saved_template_takes_arguments_as_a_json_string_too():
    """OpenAI clients send arguments as a JSON string; the saved template writes it as is."""
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = chat_template_for("chatml", tokenizer)
    as_string = [dict(m) for m in CALL_AND_ANSWER]
    as_string[2] = answer("", {"type": "function", "function": {"name": "find_book", "arguments": '{"title": "Dune"}'}})
    assert tokenizer.apply_chat_template(as_string, tools=TOOLS, tokenize=False) == render(
        CALL_AND_ANSWER, "chatml", tools=TOOLS
    )


# ---------------------------------------------------------------- reading calls back


def test_parse_tool_calls_reads_hermes_blocks_and_llama31_json():
    reply = '<tool_call>\n{"name": "find_book", "arguments": {"title": "Dune"}}\n</tool_call>\n<tool_call>\n{bad}\n</tool_call>'
    assert parse_tool_calls(reply) == [{"name": "find_book", "arguments": {"title": "Dune"}}]
    assert parse_tool_calls('{"name": "set_timer", "parameters": {"minutes": 5}}') == [
        {"name": "set_timer", "arguments": {"minutes": 5}}
    ]
    assert parse_tool_calls("Dune is on shelf B12.") == []


# ---------------------------------------------------------------- the demo data: data/tool_demo.jsonl

DEMO = Path(__file__).resolve().parents[1] / "data" / "tool_demo.jsonl"
DEMO_TOOLS = DEMO.with_name("tool_demo_tools.json")


def test_demo_data_reads_builds_and_trains_only_calls_and_answers():
    conversations = load_conversations(DEMO)
    assert len(conversations) == 40 and all(c.tools == read_tools(json.loads(DEMO_TOOLS.read_text())) for c in conversations)
    calls = [call for c in conversations for m in c.messages for call in m.get("tool_calls", [])]
    assert len(calls) == 40 and {c["function"]["name"] for c in calls} == {"find_book", "convert_currency", "set_timer"}
    assert sum(not any(m.get("tool_calls") for m in c.messages) for c in conversations) == 8  # answered directly
    tokenizer = make_tokenizer("chatml")
    data, report = build_sft_dataset_with_report(settings(dataset_path=str(DEMO), max_seq_length=4096), tokenizer)
    train = report.splits["train"]
    assert (train.records, train.kept, train.truncated, train.ignored_keys) == (40, 40, 0, {})
    for row, conversation in zip(data["train"], conversations, strict=True):
        expected = expected_supervised(conversation.messages, "chatml", "chatml", tokenizer)
        assert [tokenizer.decode(run) for run in supervised_runs(row)] == expected


@pytest.mark.slow  # ~7 s: 100 steps of a tiny model on two ~490-token rows
def test_a_tiny_model_trained_on_the_demo_makes_the_exact_tool_calls():
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from data.templates import stop_token_ids
    from tests.tiny import make_model, one_torch_thread

    conversations = load_conversations(DEMO)
    corpus = tuple(render(c.messages, "chatml", tools=c.tools) for c in conversations)
    tokenizer = make_tokenizer("chatml", 3000, corpus)  # the demo's own text: rows of ~490 tokens, not ~1300
    data = build_sft_dataset_with_report(settings(dataset_path=str(DEMO), max_seq_length=4096), tokenizer)[0]
    chosen = [i for i, c in enumerate(conversations) if any(m.get("tool_calls") for m in c.messages)][:2]
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)([data["train"][i] for i in chosen])
    model = make_model(tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with one_torch_thread():
        for _ in range(100):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        for i in chosen:
            messages, tools = conversations[i].messages, conversations[i].tools
            first_call = next(j for j, m in enumerate(messages) if m.get("tool_calls"))
            prompt = encode_prompt(messages[:first_call], "chatml", tokenizer, tools)
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=60, do_sample=False, eos_token_id=stop_token_ids("chatml", tokenizer),
                                 pad_token_id=tokenizer.pad_token_id)
            reply = tokenizer.decode(out[0, len(prompt):])
            assert reply == hermes_answer(messages[first_call]) + "<|im_end|>"
            assert parse_tool_calls(reply) == [messages[first_call]["tool_calls"][0]["function"]]
