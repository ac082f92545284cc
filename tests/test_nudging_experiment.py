"""The nudging experiment's runner (experiments/nudging.py) on tiny random models.

Tiny Llama-family models over the real SmolLM2 tokenizer stand in for the base, the aligned
model and the judge, so the whole pipeline (three systems, GSM8K scoring, order-swapped
judging, the report) runs in seconds. What is checked: a run cut short resumes without
recomputing or duplicating a row and ends with the report an uninterrupted run writes; a
resumed run with other settings is refused.
"""

import json

import pytest

from experiments import nudging as exp
from tiny import smollm_tokenizer, tiny_model

GSM8K = [{"question": f"Tom has {n} apples and eats {k}. How many are left?", "answer": f"... #### {n - k}"}
         for n, k in ((5, 2), (9, 4), (7, 7))]
ALPACA = [{"id": i, "instruction": text} for i, text in
          enumerate(("Name a colour.", "Write a haiku about rain.", "Say hello."))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "gsm8k").mkdir()
    (d / "alpaca_eval").mkdir()
    (d / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    (d / "alpaca_eval" / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    return d


@pytest.fixture(scope="module")
def models():
    tok = smollm_tokenizer()
    if tok is None:
        pytest.skip("the SmolLM2 tokenizer (registry smollm2-135m-instruct) is not available here")
    kw = dict(tokenizer=tok, vocab_size=len(tok), max_position_embeddings=4096)
    return {"tiny-base": tiny_model(seed=1, **kw), "tiny-aligned": tiny_model(seed=2, **kw),
            "tiny-judge": tiny_model(seed=3, **kw)}


def make_args(out, data_dir, **kw):
    args = exp._parser().parse_args(["--base", "tiny-base", "--aligned", "tiny-aligned", "--judge", "tiny-judge",
                                     "--max-tokens", "12", "--chunk", "4", "--batch", "2", "--dtype", "float32",
                                     "--data-dir", str(data_dir), "--out", str(out)])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


class Counting:
    """Loads the tiny models and counts nudged questions, by wrapping `alignment.nudge`."""

    def __init__(self, models, monkeypatch):
        import alignment

        self.models, self.nudged = models, 0
        real = alignment.nudge

        def counted(*a, **k):
            self.nudged += 1
            return real(*a, **k)

        monkeypatch.setattr(alignment, "nudge", counted)

    def load(self, name, dtype):
        return self.models[name]


def rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_cut_short_run_resumes_without_recomputing(tmp_path, data_dir, models, monkeypatch):
    full_out, part_out = tmp_path / "full", tmp_path / "part"
    full = exp.run(make_args(full_out, data_dir), load=Counting(models, monkeypatch).load, log=lambda *_: None)

    first = Counting(models, monkeypatch)
    exp.run(make_args(part_out, data_dir, limit=2), load=first.load, log=lambda *_: None)
    assert first.nudged == 4  # 2 questions x 2 tasks
    second = Counting(models, monkeypatch)
    resumed = exp.run(make_args(part_out, data_dir), load=second.load, log=lambda *_: None)
    assert second.nudged == 2, "a resumed run recomputed stored answers"

    keys = [(r["task"], r["system"], r["id"]) for r in rows(part_out)]
    assert len(keys) == len(set(keys)) == 2 * 3 * 3 + 3 * 3  # answers of 3 systems x 2 tasks x 3; 3 pairs x 3
    for task in ("gsm8k", "alpaca"):
        for a, b in zip(full["tasks"][task]["records"], resumed["tasks"][task]["records"]):
            for s in exp.SYSTEMS:
                assert a[s]["text"] == b[s]["text"], (task, s, a["id"])
    assert resumed["tasks"]["gsm8k"]["accuracy"] == full["tasks"]["gsm8k"]["accuracy"]
    for pair, j in full["tasks"]["alpaca"]["judge"].items():
        assert resumed["tasks"]["alpaca"]["judge"][pair]["soft_preference"] == pytest.approx(j["soft_preference"])
    report = json.loads((part_out / "nudging.json").read_text())
    assert report["tasks"]["alpaca"]["judge"].keys() == full["tasks"]["alpaca"]["judge"].keys()
    assert (part_out / "nudging.md").read_text().startswith("# Nudging")


def test_a_resumed_run_with_other_settings_is_refused(tmp_path, data_dir, models, monkeypatch):
    out = tmp_path / "run"
    loader = Counting(models, monkeypatch)
    exp.run(make_args(out, data_dir, limit=1, tasks="gsm8k"), load=loader.load, log=lambda *_: None)
    with pytest.raises(SystemExit, match="gamma: stored 0.3, now 0.5"):
        exp.run(make_args(out, data_dir, limit=1, tasks="gsm8k", gamma=0.5), load=loader.load, log=lambda *_: None)


def test_missing_data_is_a_clear_error(tmp_path):
    args = make_args(tmp_path / "out", tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="gsm8k data not found"):
        exp.run(args, load=None)


def test_summarize_only_reports_the_answered_items_and_keeps_the_runs_device(tmp_path, data_dir, models, monkeypatch):
    out = tmp_path / "run"
    loader = Counting(models, monkeypatch)
    exp.run(make_args(out, data_dir, limit=2, no_judge=True), load=loader.load, log=lambda *_: None)
    meta = json.loads((out / "run.json").read_text())
    meta["environment"]["device"]["device_kind"] = "Some GPU"  # as if made on another machine
    meta["sessions"][0]["environment"]["device"]["device_kind"] = "Some GPU"
    (out / "run.json").write_text(json.dumps(meta))
    import alignment

    monkeypatch.setattr(alignment, "nudge", lambda *a, **k: pytest.fail("summarize-only generated an answer"))
    args = make_args(out, data_dir, limit=3, summarize_only=True)  # 3 requested, 2 answered
    report = exp.summarize_only(args, log=lambda *_: None)
    for task in ("gsm8k", "alpaca"):
        assert report["tasks"][task]["n"] == 2 and report["tasks"][task]["requested"] == 3
    assert report["tasks"]["gsm8k"]["accuracy"]["nudged"]["n"] == 2
    md = (out / "nudging.md").read_text()
    assert "device Some GPU" in md and "gsm8k: partial" in md and "not judged yet" in md
    assert json.loads((out / "run.json").read_text())["environment"]["device"]["device_kind"] == "Some GPU"
    with pytest.raises(SystemExit, match="nothing to summarize"):
        exp.summarize_only(make_args(tmp_path / "empty", data_dir, summarize_only=True), log=lambda *_: None)


def test_a_run_resumed_elsewhere_says_which_device_wrote_which_rows(tmp_path, data_dir, models, monkeypatch):
    """Sessions are recorded with the first row each wrote; an older run file without them
    counts as one session. The report names both devices and where each task's rows came from,
    and --summarize-only reports the stored judgements of a finished run."""
    out = tmp_path / "run"
    loader = Counting(models, monkeypatch)
    exp.run(make_args(out, data_dir, limit=1, tasks="gsm8k"), load=loader.load, log=lambda *_: None)
    n_first = len(rows(out))
    meta = json.loads((out / "run.json").read_text())
    assert [x["first_row"] for x in meta["sessions"]] == [0]
    meta["environment"]["device"]["device_kind"] = "GPU A"
    del meta["sessions"]  # a run file from before sessions were recorded
    (out / "run.json").write_text(json.dumps(meta))

    report = exp.run(make_args(out, data_dir, limit=2), load=loader.load, log=lambda *_: None)
    meta = json.loads((out / "run.json").read_text())
    assert [(x["first_row"], x["environment"]["device"]["device_kind"]) for x in meta["sessions"]] == [
        (0, "GPU A"), (n_first, "cpu")]
    prov = report["provenance"]
    assert prov["gsm8k/base"] == {"GPU A": 1, "cpu": 1} and prov["alpaca/nudged"] == {"cpu": 2}
    assert prov["alpaca/judge:nudged>base"] == {"cpu": 2}
    md = (out / "nudging.md").read_text()
    assert "devices GPU A and cpu" in md and "| gsm8k/nudged | GPU A: 1, cpu: 1 |" in md

    import alignment

    monkeypatch.setattr(alignment, "nudge", lambda *a, **k: pytest.fail("summarize-only generated an answer"))
    again = exp.summarize_only(make_args(out, data_dir, limit=2, summarize_only=True), log=lambda *_: None)
    assert again["provenance"] == prov
    for pair, j in report["tasks"]["alpaca"]["judge"].items():
        assert again["tasks"]["alpaca"]["judge"][pair]["win_rate"] == j["win_rate"]


def test_the_report_names_the_weights_and_the_commit_of_each_session():
    """A session made from a tree with uncommitted changes says so, with the rows it wrote; the
    weights line says which quantized file each model is (SmolLM2's is Q4_1, not Q4_K_M)."""
    report = {"settings": {"base": "gemma-3-270m", "aligned": "smollm2-135m-instruct", "judge": None, "gamma": 0.3,
                           "chunk": 16, "max_tokens": 8, "dtype": "bfloat16"},
              "environment": {}, "tasks": {},
              "sessions": [{"first_row": 0, "git": {"commit": "a" * 40, "dirty": True}},
                           {"first_row": 5, "git": {"commit": "b" * 40, "dirty": False}}]}
    md = exp.markdown(report)
    assert ("Code: commit aaaaaaa with uncommitted changes (rows 0-4 of results.jsonl); "
            "commit bbbbbbb (rows 5 on of results.jsonl).") in md
    weights = next(x for x in md.splitlines() if x.startswith("Weights:"))
    assert "base `gemma-3-270m`: Gemma 3 270M (base), Q4_K_M GGUF" in weights
    assert "aligned `smollm2-135m-instruct`: SmolLM2-135M-Instruct, Q4_1 GGUF" in weights
    assert "judge" not in weights
