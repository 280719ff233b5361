"""Chat with a trained model, in the prompt template it was trained with; replies stream as generated.

    python examples/chat.py --adapter_dir ft-outputs/final                # base + adapter, interactive
    python examples/chat.py --model_dir merged-model --prompt "Tell me your name and who built you."
    python examples/chat.py --model_dir merged-model --prompt "Who are you?" --prompt "Who made you?"  # one batch
    python examples/chat.py --base_model_name HuggingFaceTB/SmolLM2-135M-Instruct   # the base alone, its own template
    echo "What's your name?" | python examples/chat.py --adapter_dir ft-outputs/final
    python examples/chat.py --adapter_dir ft-outputs/final --tools data/tool_demo_tools.json --prompt "Where is Dune?"

Model: `--adapter_dir` (its base model and settings from run_settings.json, 4-bit for QLoRA),
`--model_dir` (a merged or any transformers folder), or neither (the base model alone, default
SmolLM2-135M-Instruct). Template and system prompt: the folder's run_settings.json, as trained,
unless `--prompt_template` / `--system_prompt` say otherwise; the base alone uses its tokenizer's
chat template. Greedy decoding; a reply ends at any stop id (eos, the template's turn end, and
every eos id of the generation config).

Interactive mode reads one user turn per line from stdin and keeps the conversation; `/reset`
starts a new one, `/exit` or end of input quits. `--prompt` (repeatable) answers and exits: one
prompt streams, several are generated as one left-padded batch.

Tools: `--tools FILE` offers the model the function schemas in FILE (a JSON list, each
{"name", "description", "parameters"} or OpenAI's {"type": "function", "function": ...}), written
into the prompt as in training. A reply that calls a tool is shown as `[tool call] name({...})`
and kept as a tool call; in interactive mode `/tool TEXT` then gives the tool's result and the
model answers from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: repo modules first
import runs  # noqa: E402, F401  (before any library: quietens bitsandbytes' import-time kernel warning)

import torch  # noqa: E402

from config import TEMPLATES, get_settings  # noqa: E402
from data.readers import read_tools  # noqa: E402
from data.tools import parse_tool_calls  # noqa: E402
from inference import generate_replies, generation_stop_ids, load_adapter_model, stream_reply  # noqa: E402
from models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from runs import cli, processes  # noqa: E402
from techniques.lora import adapter_settings  # noqa: E402


def main(argv: list[str] | None = None, stdin=None, out=None) -> list[list[dict]]:
    """Run the chat; returns every conversation held (the messages, replies included)."""
    args = parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    processes.setup_logging()  # as the training scripts: no PEFT FutureWarning, no redrawn bars off a terminal

    # 1. Model, tokenizer, and the template + system prompt it was trained with.
    model, tokenizer, template, system_prompt = load_chat_model(args)
    stops = generation_stop_ids(model, tokenizer, template)
    tools = read_tools(json.loads(args.tools.read_text()), str(args.tools)) if args.tools else None
    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    print(f"[template {template} | stop ids {stops} | device {next(model.parameters()).device}"
          f"{f' | tools {len(tools)}' if tools else ''}]", file=out, flush=True)

    def reply_to(messages: list[dict]) -> dict:
        text = say(stream_reply(model, tokenizer, messages, template, args.max_new_tokens, stops, tools), out)
        return assistant_message(text, out)

    # 2. One-shot: one prompt streams, several go as one batch.
    if args.prompt:
        conversations = [start + [{"role": "user", "content": p}] for p in args.prompt]
        if len(conversations) == 1:
            return [conversations[0] + [reply_to(conversations[0])]]
        replies = generate_replies(model, tokenizer, conversations, template, args.max_new_tokens,
                                   batch_size=len(conversations), stop_ids=stops, tools=tools)
        answers = []
        for prompt, reply in zip(args.prompt, replies):
            print(f"user> {prompt}\nassistant> {reply}", file=out, flush=True)
            answers.append(assistant_message(reply, out))
        return [c + [a] for c, a in zip(conversations, answers)]

    # 3. Interactive: each line is a user turn (or, after a tool call, `/tool RESULT`); the
    #    conversation grows until /reset.
    conversations, messages = [], list(start)
    print("[one message per line; /tool RESULT answers a tool call, /reset starts over, /exit quits]",
          file=out, flush=True)
    for line in stdin:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            conversations.append(messages)
            messages = list(start)
            continue
        if not text:
            continue
        if text.startswith("/tool "):
            messages.append({"role": "tool", "content": text.removeprefix("/tool ").strip()})
            print(f"tool> {messages[-1]['content']}", file=out, flush=True)
        else:
            messages.append({"role": "user", "content": text})
            print(f"user> {text}", file=out, flush=True)
        messages.append(reply_to(messages))
    return conversations + [messages]


def assistant_message(reply: str, out) -> dict:
    """The reply as an assistant message; a reply that calls tools keeps them as `tool_calls` (the
    text before the first call as content), so later turns render it as training wrote calls."""
    calls = parse_tool_calls(reply)
    for call in calls:
        print(f"[tool call] {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})", file=out, flush=True)
    if not calls:
        return {"role": "assistant", "content": reply}
    content = reply.split("<tool_call>")[0].strip() if "<tool_call>" in reply else ""
    return {"role": "assistant", "content": content,
            "tool_calls": [{"type": "function", "function": call} for call in calls]}


def say(pieces, out) -> str:
    """Print streamed text pieces as they come; return the whole reply, stripped."""
    print("assistant> ", end="", file=out, flush=True)
    text = ""
    for piece in pieces:
        text += piece
        print(piece, end="", file=out, flush=True)
    print(file=out, flush=True)
    return text.strip()


def load_chat_model(args: argparse.Namespace):
    """(model, tokenizer, template, system_prompt) for an adapter folder, a model folder, or the base."""
    if args.adapter_dir is not None:
        settings = adapter_settings(args.adapter_dir, base_model_name=args.base_model_name)
        model = load_adapter_model(args.adapter_dir, settings)
        has_tokenizer = (args.adapter_dir / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(settings, args.adapter_dir if has_tokenizer else resolve_model_path(settings))
        saved = {"prompt_template": settings.prompt_template, "system_prompt": settings.system_prompt}
    else:
        settings = get_settings([] if args.base_model_name is None else ["--base_model_name", args.base_model_name],
                                env_file=None)
        path = args.model_dir if args.model_dir is not None else resolve_model_path(settings)
        model, tokenizer = load_model(settings, path), load_tokenizer(settings, path)
        if torch.cuda.is_available():
            model.to("cuda")
        saved_file = Path(path) / "run_settings.json"
        saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {"prompt_template": "tokenizer"}
    template = args.prompt_template or saved["prompt_template"]
    system_prompt = args.system_prompt if args.system_prompt is not None else saved.get("system_prompt")
    return model, tokenizer, template, system_prompt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--adapter_dir", type=Path, help="adapter folder from training (base model read from it)")
    source.add_argument("--model_dir", type=Path, help="merged (or any transformers) model folder")
    parser.add_argument("--base_model_name", help="base model: hub id, folder or .gguf (default: from the adapter "
                        "folder, else SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt_template", choices=TEMPLATES, help="override the saved template")
    parser.add_argument("--system_prompt", help="override the saved system prompt ('' for none)")
    parser.add_argument("--prompt", action="append", help="answer this and exit (repeat for a batch)")
    parser.add_argument("--tools", type=Path, help="JSON file of function schemas offered to the model")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest reply, in tokens")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main)
