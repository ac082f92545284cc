"""The results file: durable appends, resume keys, and damaged files never overwritten silently."""

import json

import pytest

from experiments.store import CorruptResults, LockedResults, ResultsError, ResultsStore, TruncatedResults


def _row(method, qid, turn=1, **kw):
    return {"method": method, "question_id": qid, "turn": turn, **kw}


def test_rows_survive_reopening_and_keys_are_unique(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsStore.open(path) as store:
        store.append(_row("ar", 1, time_s=0.5))
        store.append(_row("ar", 1, turn=2))
        store.append(_row("spec", 1))
        with pytest.raises(ResultsError, match="second row"):
            store.append(_row("ar", 1, time_s=9.0))
    with ResultsStore.open(path) as store:
        assert len(store) == 3
        assert ("ar", 1, 1) in store and ("spec", 1, 2) not in store
        assert store.get(("ar", 1, 1))["time_s"] == 0.5
    assert path.read_text().count("\n") == 3


def test_truncated_last_line_is_reported_and_left_untouched(tmp_path):
    path = tmp_path / "results.jsonl"
    good = [json.dumps(_row("ar", i)) for i in range(3)]
    original = ("\n".join(good) + "\n" + '{"method": "ar", "question_id": 3, "tu').encode()
    path.write_bytes(original)
    with pytest.raises(TruncatedResults) as info:
        ResultsStore.open(path)
    message = str(info.value)
    assert "--repair" in message and "incomplete" in message and "3 complete row" in message
    assert path.read_bytes() == original  # nothing rewritten
    assert not (tmp_path / "results.jsonl.bak").exists()


def test_repair_keeps_good_rows_and_moves_the_original_aside(tmp_path):
    path = tmp_path / "results.jsonl"
    original = (json.dumps(_row("ar", 1)) + "\n" + json.dumps(_row("ar", 2)) + "\n" + '{"meth').encode()
    path.write_bytes(original)
    messages = []
    with ResultsStore.open(path, repair_file=True, log=messages.append) as store:
        assert store.keys() == {("ar", 1, 1), ("ar", 2, 1)}
        store.append(_row("ar", 3))
    assert (tmp_path / "results.jsonl.bak").read_bytes() == original
    assert [json.loads(x)["question_id"] for x in path.read_text().splitlines()] == [1, 2, 3]
    assert "kept 2 row(s)" in messages[0]
    # A second repair never overwrites the first backup.
    path.write_bytes(path.read_bytes() + b"garbage")
    with ResultsStore.open(path, repair_file=True, log=messages.append):
        pass
    assert (tmp_path / "results.jsonl.bak").read_bytes() == original
    assert (tmp_path / "results.jsonl.bak.1").read_bytes().endswith(b"garbage")


def test_garbage_inside_the_file_is_reported_with_line_numbers(tmp_path):
    path = tmp_path / "results.jsonl"
    lines = [json.dumps(_row("ar", 1)), "this is not json", json.dumps({"method": "ar"}), json.dumps(_row("ar", 1))]
    original = ("\n".join(lines) + "\n").encode()
    path.write_bytes(original)
    with pytest.raises(CorruptResults) as info:
        ResultsStore.open(path)
    message = str(info.value)
    assert "line 2: not JSON" in message and "line 3: lacks the key field" in message
    assert "line 4: duplicate row" in message and "--repair" in message
    assert path.read_bytes() == original
    with ResultsStore.open(path, repair_file=True, log=lambda m: None) as store:
        assert store.keys() == {("ar", 1, 1)}


def test_a_second_writer_is_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsStore.open(path):
        with pytest.raises(LockedResults, match="another process"):
            ResultsStore.open(path)
    with ResultsStore.open(path):  # the lock is released on close
        pass


def test_a_stated_source_commit_wins_over_the_local_git(monkeypatch):
    """A tree copied beside another repository's `.git` states its own commit."""
    from experiments import environment

    monkeypatch.setenv("DECODING_SOURCE_COMMIT", "abc1234")
    monkeypatch.delenv("DECODING_SOURCE_DIRTY", raising=False)
    assert environment.git_revision() == {"commit": "abc1234", "dirty": False, "source": "DECODING_SOURCE_COMMIT"}
    monkeypatch.setenv("DECODING_SOURCE_DIRTY", "1")
    assert environment.git_revision()["dirty"] is True
    monkeypatch.delenv("DECODING_SOURCE_COMMIT")
    assert environment.git_revision().get("source") is None


def test_a_report_header_names_the_device_count_commit_and_a_dirty_tree():
    from experiments import environment

    env = {"device": {"device_kind": "NVIDIA H100 80GB HBM3", "platform": "gpu"},
           "git": {"commit": "abc1234", "dirty": False}}
    assert environment.device_commit_line(env, 2) == "Device: NVIDIA H100 80GB HBM3 (gpu) x 2; commit abc1234"
    env["git"]["dirty"] = True
    assert environment.device_commit_line(env).endswith("x 1; commit abc1234 (with uncommitted changes)")
