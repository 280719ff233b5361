"""Deploy: GGUF export with llama.cpp's own converter and its checked round trip, on a tiny Llama.

The converter is fetched once (pip download of the llama-cpp-python sdist, cached under
~/.cache/ft-kit); each export then runs it as a subprocess (~5 s, mostly importing torch).
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import export
from export import check_gguf_metadata, export_gguf, export_lora_gguf, gguf_metadata
from tests.test_merge import make_adapter_dir
from tests.test_lora import logits
from tests.tiny_model import CHATML_TEMPLATE, make_tiny_llama_tokenizer, make_tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import export_gguf as export_gguf_script  # noqa: E402

def tiny_model_dir(parent):
    """A tiny Llama whose eos (<|endoftext|>, 0) differs from the ChatML turn end (<|im_end|>, 2),
    so a reply has two stop ids and the GGUF must hold both."""
    tokenizer = make_tiny_llama_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    return make_tiny_model_dir(parent, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A ChatML adapter on the tiny Llama, exported straight from its folder (merged first) to f16 by
    the README's "Deploy" Python block, run as written."""
    root = tmp_path_factory.mktemp("export")
    adapter_dir, adapter_model = make_adapter_dir(root, tiny_model_dir(root), "chatml", stop_ids=[0, 2])
    expected = logits(adapter_model)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("## Deploy"):].split("```python\n")[1].split("```")[0]
    assert "export_gguf(" in block
    namespace = {}
    exec(compile(block.replace('"merged-model"', repr(str(adapter_dir))), "README.md", "exec"), namespace)
    return root, adapter_dir, expected, namespace["report"]


def test_export_from_an_adapter_answers_like_the_adapter_model(exported):
    root, _, expected, report = exported
    gguf_model = AutoModelForCausalLM.from_pretrained(root, gguf_file="adapter-f16.gguf", dtype=torch.float32)
    got = logits(gguf_model)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-3  # f16 rounding of a 32-wide model: ~2e-4
    assert 0 < report.max_abs_diff <= report.tolerance == pytest.approx(3e-2)  # |logits| < 1 here
    assert report.top1_agreement > 0.95 and report.probe_positions > 50


def test_gguf_holds_the_saved_chat_template_and_every_stop_id(exported):
    root, adapter_dir, _, report = exported
    meta = gguf_metadata(root / "adapter-f16.gguf")
    assert report.path == root / "adapter-f16.gguf"  # default name: <model_dir>-<outtype>.gguf
    saved = (adapter_dir / "chat_template.jinja").read_text()
    assert saved == CHATML_TEMPLATE and meta["tokenizer.chat_template"] == saved
    assert report.chat_template_bytes == len(saved.encode())
    # eos from the tokenizer, the ChatML turn end added into the free eot slot
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"]) == (0, 2)
    assert report.stop_ids == [0, 2]
    assert meta["general.file_type"] == 1  # MOSTLY_F16
    assert report.modelfile.read_text() == (
        'FROM ./adapter-f16.gguf\nPARAMETER stop "<|endoftext|>"\nPARAMETER stop "<|im_end|>"\n')


def test_export_leaves_only_the_gguf_and_its_modelfile(exported):
    root, adapter_dir, _, _ = exported
    names = {p.name for p in root.iterdir()} - {"adapter-f32.gguf", "adapter-f32.jinja"}  # the LoRA test's
    assert names == {adapter_dir.name, "tiny-llama", "adapter-f16.gguf", "adapter-f16.Modelfile"}


def test_metadata_check_rejects_another_template_or_a_missing_stop_id(exported):
    path = exported[0] / "adapter-f16.gguf"
    with pytest.raises(ValueError, match="differs from the saved chat template"):
        check_gguf_metadata(path, CHATML_TEMPLATE + " ", [0, 2])
    with pytest.raises(ValueError, match=r"stop ids \[5\]"):
        check_gguf_metadata(path, CHATML_TEMPLATE, [0, 2, 5])


def test_a_failed_round_trip_check_leaves_no_file(tmp_path, monkeypatch):
    model_dir = tiny_model_dir(tmp_path)
    monkeypatch.setitem(export.GGUF_TOLERANCE, "f16", 1e-9)  # f16 rounding alone exceeds this
    with pytest.raises(ValueError, match=r"the f16 GGUF differs from .*tiny-llama: max \|logit diff\| .* > 1e-09"):
        export_gguf_script.main(["--model_dir", str(model_dir), "--outtype", "f16"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]  # no .gguf, Modelfile or temp folder


def test_bad_requests_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(export.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="q4_k_m .*needs llama.cpp's llama-quantize binary on PATH"):
        export_gguf(tmp_path, outtype="q4_k_m")
    with pytest.raises(ValueError, match="outtype='q5'"):
        export_gguf(tmp_path, outtype="q5")
    with pytest.raises(FileNotFoundError, match="neither config.json .* nor adapter_config.json"):
        export_gguf(tmp_path, outtype="f16", cache_dir=tmp_path / "never-fetched")
    assert not (tmp_path / "never-fetched").exists()  # checked before anything is fetched


@pytest.fixture(scope="module")
def lora_exported(exported):
    root, adapter_dir, _, _ = exported
    return adapter_dir, export_lora_gguf(adapter_dir, root / "adapter-f32.gguf", "f32")


def test_lora_adapter_gguf_keeps_alpha_and_every_update(lora_exported):
    _, report = lora_exported
    meta = gguf_metadata(report.path)
    assert (meta["general.type"], meta["adapter.type"], meta["adapter.lora.alpha"]) == ("adapter", "lora", 32.0)
    n_modules = 2 * 7  # 2 layers x all-linear (q, k, v, o, gate, up, down)
    assert len([k for k in _tensor_names(report.path) if k.endswith(".lora_a")]) == n_modules
    assert report.chat_template_file.read_text() == CHATML_TEMPLATE  # a GGUF adapter holds none


def test_lora_check_catches_a_changed_update(lora_exported, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter_dir, report = lora_exported
    changed = tmp_path / "changed"
    shutil.copytree(adapter_dir, changed)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    name = next(k for k in weights if ".lora_B." in k)
    weights[name] = weights[name] * 1.01
    save_file(weights, str(changed / "adapter_model.safetensors"))
    export._check_lora_tensors(report.path, adapter_dir, 32.0, "f32")  # passes against its own adapter
    with pytest.raises(ValueError, match=r"\|\|B @ A\|\| differs from the adapter's by 0\.0[0-9]+ \(relative\) > 0\.0001"):
        export._check_lora_tensors(report.path, changed, 32.0, "f32")
    with pytest.raises(ValueError, match="adapter.lora.alpha 32.0 != lora_alpha 16.0"):
        export._check_lora_tensors(report.path, adapter_dir, 16.0, "f32")


def _tensor_names(path: Path) -> list[str]:
    import gguf

    return [t.name for t in gguf.GGUFReader(str(path)).tensors]
