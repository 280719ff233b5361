"""The chat template saved with a trained model renders exactly like the template it trained on.

Without it a merged or adapter folder carries the base's own template (ChatML for SmolLM2), and a
server that renders with the tokenizer (vLLM, TGI) would prompt an alpaca-trained model wrongly.
"""

import pytest

from data.readers import to_messages
from data.templates import chat_template_for, render
from tests.tiny import make_tokenizer

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    "system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": " Blue. "},
    ],
    "multi": [
        {"role": "system", "content": "You are Orrin."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Who made you?"},
        {"role": "assistant", "content": "Kestrel Works."},
    ],
    "alpaca_input": to_messages({"instruction": "Answer the question.", "input": "What's your name?", "output": "Orrin."}),
}

FAMILY = {"alpaca": "chatml", "chatml": "chatml", "phi3": "phi3", "llama3": "llama3"}


@pytest.mark.parametrize("template", sorted(FAMILY))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_saved_template_renders_like_training(template, name, add_generation_prompt):
    tokenizer = make_tokenizer(FAMILY[template])
    tokenizer.chat_template = chat_template_for(template, tokenizer)
    messages = CONVERSATIONS[name]
    if add_generation_prompt:
        messages = messages[:-1]  # end on the user's turn, as a server does
    expected = render(messages, template, tokenizer, add_generation_prompt=add_generation_prompt)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt) == expected


def test_alpaca_saved_template_is_the_stanford_prompt():
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = chat_template_for("alpaca", tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False)
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWho are you?\n\n### Response:"
    )


def test_tokenizer_template_keeps_the_models_own():
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = "{{ 'own' }}"
    assert chat_template_for("tokenizer", tokenizer) == "{{ 'own' }}"
    with pytest.raises(ValueError, match="unknown prompt template"):
        chat_template_for("vicuna", tokenizer)
