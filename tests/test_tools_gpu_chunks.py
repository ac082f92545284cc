"""Splitting registry files into transfer chunks and reassembling them with verification."""

import dataclasses
import hashlib

import pytest

from decoding import registry
from experiments import gpu_chunks


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
    costs device time, so every method list of experiments/gpu_stage.sh must resolve here,
    and the script must parse."""
    import re
    import subprocess
    from pathlib import Path

    from experiments import methods

    script = Path(__file__).resolve().parents[1] / "experiments" / "gpu_stage.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text().replace("\\\n", " ")
    lists = re.findall(r'--methods\s+"?(?:\$\{METHODS:-)?([\w:=,+]+)', text)
    kept = re.findall(r'^\w+_METHODS=([\w:=,+]+)', text, flags=re.M)  # lists kept in a variable (all_b1)
    assert kept, "ALL_B1_METHODS not found"
    lists += kept
    assert len(lists) >= 7, lists  # ref16_b1, graphs_b1, ref16_b8, tuned_b1, tree_sweep, all_b8, fp32
    for item in lists:
        assert methods.resolve([item], check=False), item
