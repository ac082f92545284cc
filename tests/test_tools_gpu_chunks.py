"""tools/: splitting registry files into transfer chunks and reassembling them with verification,
and the GPU stage script's method lists. tools/ is not a package: its files are imported by path."""

import dataclasses
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from decoding import registry

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_chunks = _load("gpu_chunks")


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    data = bytes(range(256)) * 9000  # 2.3 MB
    src = tmp_path / "src" / "tiny.gguf"
    src.parent.mkdir()
    src.write_bytes(data)
    base = registry.list_models()[0]
    entry = dataclasses.replace(base, name="tiny", filename="tiny.gguf", size=len(data),
                                sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(registry, "fetch", lambda name, **kw: src)
    monkeypatch.setattr(registry, "list_models", lambda: [entry])
    return entry, data


def test_split_then_reassemble_restores_the_file(tmp_path, fake_entry):
    entry, data = fake_entry
    folders = gpu_chunks.split(["tiny"], out=tmp_path / "gpu", chunk_mb=1)
    assert len(folders) == 3 and all(len(list(f.iterdir())) == 1 for f in folders)
    parts = tmp_path / "parts"
    parts.mkdir()
    for f in folders:
        for p in f.iterdir():
            (parts / p.name).write_bytes(p.read_bytes())
    out = gpu_chunks.reassemble(parts, tmp_path / "out")
    assert out[0].read_bytes() == data
    assert registry.is_verified(out[0], entry.sha256)


def test_a_missing_chunk_is_reported_and_nothing_is_kept(tmp_path, fake_entry):
    folders = gpu_chunks.split(["tiny"], out=tmp_path / "gpu", chunk_mb=1)
    parts = tmp_path / "parts"
    parts.mkdir()
    for f in folders[:-1]:  # the last chunk never arrived
        for p in f.iterdir():
            (parts / p.name).write_bytes(p.read_bytes())
    with pytest.raises(SystemExit, match="missing or damaged"):
        gpu_chunks.reassemble(parts, tmp_path / "out")
    assert not (tmp_path / "out" / "tiny.gguf").exists()


def test_every_gpu_stage_names_methods_the_harness_knows():
    """The GPU stages are run on a machine lent for minutes: a misspelt method or option there
    costs device time, so every method list of tools/gpu_stage.sh must resolve here,
    and the script must parse."""
    import re

    from experiments import methods

    script = TOOLS / "gpu_stage.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text().replace("\\\n", " ")
    lists = re.findall(r'--methods\s+"?(?:\$\{METHODS:-)?([\w:=,+]+)', text)
    kept = re.findall(r'^\w+_METHODS=([\w:=,+]+)', text, flags=re.M)  # lists kept in a variable (all_b1)
    assert kept, "ALL_B1_METHODS not found"
    lists += kept
    assert len(lists) >= 7, lists  # ref16_b1, graphs_b1, ref16_b8, tuned_b1, tree_sweep, all_b8, fp32
    for item in lists:
        assert methods.resolve([item], check=False), item


def test_gpu_chunks_runs_as_a_script_from_any_folder(tmp_path):
    """`python tools/gpu_chunks.py ...` works from a checkout (tools/ is not installed)."""
    out = subprocess.run([sys.executable, str(TOOLS / "gpu_chunks.py"), "reassemble", str(tmp_path), str(tmp_path / "o")],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o").is_dir()


def test_tools_import_nothing_of_experiments():
    """tools/ moves files to a GPU machine; it must run without the benchmark scripts."""
    for path in TOOLS.iterdir():
        if not (path.is_file() and path.suffix in (".py", ".sh")):
            continue
        text = path.read_text()
        assert "from experiments" not in text and "import experiments" not in text, path
