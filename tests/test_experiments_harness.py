"""The Spec-Bench runner: selection, method specs, multi-turn prompts, kill/resume, damaged files.

No real model: methods are fakes registered from a plugin module (they log every call, so a
test can count invocations), plus the core's autoregressive strategy on the random toy model.
"""

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import methods, questions, specbench
from experiments.methods import Method, MethodSpec

REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""Fake methods for the harness tests: answer "ans <marker>" and log each call."""
import os, re, time

from experiments import methods
from experiments.methods import Generation, Method, MethodSpec
from experiments.toy import ByteTokenizer

TOK = ByteTokenizer()


def log(line):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(line + "\\n")
        f.flush()
        os.fsync(f.fileno())


class Fake(Method):
    warmup_per_shape = False
    cost = {"kind": "ar"}

    def warmup(self, prompts, seed):
        log(f"{self.label} warmup")
        return 0.0

    def generate(self, prompts, seed):
        if self.name == "fake_fail":
            raise RuntimeError("this method always fails")
        rows = []
        for p in prompts:
            marker = re.findall(r"ask-\\d+-\\d", TOK.decode(p))[-1]
            log(f"{self.label} {marker}")
            if os.environ.get("FAKE_PROMPTS"):
                with open(os.environ["FAKE_PROMPTS"], "a") as f:
                    f.write(TOK.decode(p) + "\\x00")
            rows.append(list(f"ans {marker}".encode()) + [TOK.eos_token_id])
        delay = float(os.environ.get("FAKE_DELAY", "0"))
        time.sleep(delay)
        return Generation(tokens=rows, texts=[TOK.decode(r, skip_special_tokens=True) for r in rows],
                          run_s=delay or 0.01, target_forwards=max(len(r) for r in rows), tau=1.0)


for _name in ("fake_a", "fake_b", "fake_fail"):
    methods.register(MethodSpec(_name, "fake", lambda env, opts, n=_name: Fake(n, n, opts), {"knob": 1}),
                     replace=True)
'''

QUESTIONS = [
    {"question_id": 101, "category": "writing", "turns": ["ask-101-1 write a poem", "ask-101-2 shorter"]},
    {"question_id": 102, "category": "writing", "turns": ["ask-102-1 write a note", "ask-102-2 longer"]},
    {"question_id": 201, "category": "qa", "turns": ["ask-201-1 who?"]},
    {"question_id": 202, "category": "qa", "turns": ["ask-202-1 what?"]},
    {"question_id": 203, "category": "qa", "turns": ["ask-203-1 when?"]},
    {"question_id": 204, "category": "qa", "turns": ["ask-204-1 where?"]},
    {"question_id": 301, "category": "translation", "turns": ["ask-301-1 hallo"]},
    {"question_id": 302, "category": "translation", "turns": ["ask-302-1 bonjour"]},
]
ALL_KEYS = {(q["question_id"], t) for q in QUESTIONS for t in range(1, len(q["turns"]) + 1)}


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """A question file, the plugin on the path, and a log of fake calls."""
    qfile = tmp_path / "question.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "fake_methods_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    importlib.import_module("fake_methods_plugin")
    return tmp_path, qfile


def _args(qfile, out, *extra):
    return ["--target", "toy", "--draft", "none", "--questions", str(qfile), "--out", str(out), "--no-progress",
            "--profile", "none", "--plugin", "fake_methods_plugin", *extra]


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]


def _calls(tmp_path):
    path = tmp_path / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


# --------------------------------------------------------------------------------------------
# Questions and method specs
# --------------------------------------------------------------------------------------------


def test_missing_question_file_names_the_path_and_the_source(tmp_path):
    missing = tmp_path / "nowhere" / "question.jsonl"
    with pytest.raises(questions.QuestionsError) as info:
        questions.load_questions(missing)
    assert str(missing) in str(info.value) and "hemingkx/Spec-Bench" in str(info.value)
    assert specbench.main(["--target", "toy", "--methods", "ar", "--questions", str(missing),
                           "--out", str(tmp_path / "o")]) == 2


@pytest.mark.skipif(not questions.DEFAULT_QUESTIONS.is_file(), reason="../shared/data/spec_bench is absent")
def test_reference16_and_the_real_file():
    qs = questions.load_questions()
    assert len(qs) == 480
    ref = questions.select(qs, "reference16")
    assert len(ref) == 16 and all(it.turn == 1 for it in ref)
    per = {}
    for it in ref:
        per[it.category] = per.get(it.category, 0) + 1
    assert per == {c: 2 for c in questions.REFERENCE16_CATEGORIES}
    assert [it.question_id for it in ref[:2]] == [81, 82]  # the first two writing questions
    everything = questions.select(qs, "all")
    assert len(everything) == 480 + 80 and sum(it.turn == 2 for it in everything) == 80
    assert len(questions.select(qs, "all", per_category=6, first_turn_only=True)) == 13 * 6


def test_selection_puts_second_turns_after_all_first_turns(bench):
    _, qfile = bench
    items = questions.select(questions.load_questions(qfile), "all")
    turns = [it.turn for it in items]
    assert turns == sorted(turns) and len(items) == len(ALL_KEYS)
    assert [it.question_id for it in questions.select(questions.load_questions(qfile), "all", per_category=1)] == [
        101, 201, 301, 101]
    with pytest.raises(questions.QuestionsError, match="unknown categories"):
        questions.select(questions.load_questions(qfile), categories=["poetry"])


def test_method_strings(bench):
    r = methods.parse("fake_a:knob=3")
    assert r.label == "fake_a:knob=3" and r.options == {"knob": 3}
    assert methods.parse("fake_a:knob=1").label == "fake_a"  # default options are not in the label
    assert methods.parse("spec:gamma=4").label == "spec" and methods.parse("spec:gamma=6").label == "spec:gamma=6"
    with pytest.raises(methods.MethodSpecError, match="unknown method 'nope'"):
        methods.parse("nope")
    with pytest.raises(methods.MethodSpecError, match="unknown option 'gama'.*gamma"):
        methods.parse("spec:gama=3")
    with pytest.raises(methods.MethodSpecError, match="expected a int"):
        methods.parse("spec:gamma=many")
    with pytest.raises(methods.MethodSpecError, match="listed twice"):
        methods.resolve(["fake_a,fake_a:knob=1"])
    assert [r.label for r in methods.resolve(["ar,fake_a", "fake_b"])] == ["ar", "fake_a", "fake_b"]


def _run_toy_ar(monkeypatch, read_switch, labels):
    """Run each method label on the toy model; return the generations and
    `read_switch(options)` of the `decoding.Options` each `decoding.generate` call received."""
    import decoding

    env = specbench.BenchEnv(specbench.BenchConfig(target="toy", draft=None, max_new_tokens=3))
    seen, real = [], decoding.generate

    def spy(*a, **k):
        seen.append(read_switch(k.get("options") or decoding.Options()))
        return real(*a, **k)

    monkeypatch.setattr(decoding, "generate", spy)
    return [methods.parse(label).build(env).generate([list(b"hello")], 0) for label in labels], seen


def test_graphs_option_sets_the_command_buffers_of_that_method_alone(bench, monkeypatch):
    assert methods.parse("ar:graphs=while").label == "ar:graphs=while"
    assert methods.parse("spec:graphs=while").options == {"gamma": 4, "confidence": 0.0, "graphs": "while",
                                                          "attention": "", "projections": ""}
    assert methods.parse("ar:graphs=fusion+while").options["graphs"] == "fusion+while"
    with pytest.raises(methods.MethodSpecError, match="graphs='NOPE'.*unknown: NOPE"):
        methods.parse("ar:graphs=NOPE")
    (plain, graphs, kinds), seen = _run_toy_ar(monkeypatch, lambda opts: opts.command_buffers,
                                               ["ar", "ar:graphs=while", "ar:graphs=fusion+while"])
    assert seen == ["", "while", "FUSION,WHILE"]
    assert graphs.tokens == plain.tokens == kinds.tokens
    assert plain.row_forwards == [len(t) for t in plain.tokens]  # each row's own calls (tau 1.00)


def test_attention_option_sets_the_kernel_of_that_method_alone(bench, monkeypatch):
    """`attention=pallas` reaches `generate` as that method's `Options` (same tokens), and a bad
    value is refused before any work. The kernel's own numerics, the model's layers with it
    included, are tested in tests/test_kernels.py."""
    assert methods.parse("ar:attention=pallas").label == "ar:attention=pallas"
    assert methods.parse("spec:attention=xla").options == {"gamma": 4, "confidence": 0.0, "graphs": "",
                                                           "attention": "xla", "projections": ""}
    with pytest.raises(methods.MethodSpecError, match="attention='cuda' is not 'xla' or 'pallas'"):
        methods.parse("ar:attention=cuda")
    (plain, kernel), seen = _run_toy_ar(monkeypatch, lambda opts: opts.attention, ["ar", "ar:attention=pallas"])
    assert seen == ["xla", "pallas"]
    assert kernel.tokens == plain.tokens


def test_projections_option_sets_the_kernels_of_that_method_alone(bench, monkeypatch):
    """`projections=pallas` reaches `generate` as that method's `Options` (same greedy tokens on
    the toy model, the kernels interpreted on CPU); a bad value is refused before any work. The
    kernels' numerics are tested in tests/test_kernels_projection.py."""
    assert methods.parse("tree:projections=pallas").options["projections"] == "pallas"
    with pytest.raises(methods.MethodSpecError, match="projections='triton' is not 'xla' or 'pallas'"):
        methods.parse("ar:projections=triton")
    (plain, kernel), seen = _run_toy_ar(monkeypatch, lambda opts: opts.projections,
                                        ["ar", "ar:projections=pallas"])
    assert seen == ["xla", "pallas"]
    assert kernel.tokens == plain.tokens


def test_options_added_later_do_not_change_what_stored_rows_mean(tmp_path):
    """Rows stored before an option existed ({"gamma": 4}) still resume under the same label: a
    missing option stands at its default. An option set away from its default is another method."""
    stored = {"methods": {"spec": {"options": {"gamma": 4}}}}
    specbench.check_method_options(stored, methods.resolve(["spec"], check=False), tmp_path)
    for changed in ({"gamma": 4, "attention": "pallas"}, {"gamma": 4, "confidence": 0.5}, {"gamma": 5}):
        stored = {"methods": {"spec": {"options": changed}}}
        with pytest.raises(specbench.SettingsMismatch):
            specbench.check_method_options(stored, methods.resolve(["spec"], check=False), tmp_path)


def test_spec_confidence_option_reaches_the_strategy():
    env = specbench.BenchEnv(specbench.BenchConfig(target="toy", draft="toy-draft", max_new_tokens=3))
    assert methods.parse("spec").build(env).strategy.confidence is None
    r = methods.parse("spec:gamma=6:confidence=0.4")
    assert r.label == "spec:confidence=0.4:gamma=6"
    assert r.build(env).strategy.confidence == pytest.approx(0.4)


def test_missing_core_strategies_give_a_clear_error():
    check = methods.needs("decoding.NoSuchStrategy", method="future")
    with pytest.raises(methods.MethodUnavailable, match="decoding.NoSuchStrategy.*which decoding does not define"):
        check()
    with pytest.raises(methods.MethodUnavailable, match="cannot be imported"):
        methods.needs("no_such_package.Thing", method="future")()


# --------------------------------------------------------------------------------------------
# In-process runs
# --------------------------------------------------------------------------------------------


class _Tweaked(Method):
    """The core's autoregressive method, with question 201's output changed (a greedy mismatch)."""

    def __init__(self, env, opts):
        super().__init__("ar_tweaked", "ar_tweaked", opts)
        self.inner, self.env = methods.parse("ar").build(env), env
        self.cost = {"kind": "ar"}

    def warmup(self, prompts, seed):
        return self.inner.warmup(prompts, seed)

    def generate(self, prompts, seed):
        gen = self.inner.generate(prompts, seed)
        for i, p in enumerate(prompts):
            if "ask-201-1" in self.env.tokenizer.decode(p):
                gen.tokens[i] = [t ^ 1 for t in gen.tokens[i]]
        return gen


def test_toy_run_with_the_core_baseline(bench, monkeypatch):
    tmp_path, qfile = bench
    monkeypatch.setenv("FAKE_PROMPTS", str(tmp_path / "prompts.txt"))
    methods.register(MethodSpec("ar_tweaked", "test", lambda env, opts: _Tweaked(env, opts)), replace=True)
    out = tmp_path / "out"
    code = specbench.main(_args(qfile, out, "--methods", "ar,ar_tweaked,fake_a", "--max-new-tokens", "4",
                                "--profile", "h100-sxm"))
    assert code == 0
    rows = _rows(out)
    assert len(rows) == 3 * len(ALL_KEYS)
    summary = json.loads((out / "summary.json").read_text())
    s = summary["summary"]
    assert s["baseline"] == "ar"
    assert s["greedy_check"]["ar_tweaked"]["mismatched"] == ["201/turn1"]
    assert s["greedy_check"]["fake_a"]["mismatches"] == len(ALL_KEYS)
    assert s["methods"]["ar"]["overall"]["tau"] == pytest.approx(1.0)
    assert s["methods"]["ar"]["predicted"]["speedup"] == pytest.approx(1.0)
    assert summary["run"]["identity"]["device_kind"] == "cpu" and "jax" in summary["run"]["sessions"][0][
        "environment"]["versions"]
    for name in ("summary.md", "speedup.png", "tau.png", "run.json", "events.jsonl"):
        assert (out / name).is_file(), name
    md = (out / "summary.md").read_text()
    assert "| Method | MT-bench | Translation | QA |" in md and "201/turn1" in md
    # Turn 2 is asked after the method's own turn-1 answer, in the chat history.
    prompts = [p for p in (tmp_path / "prompts.txt").read_text().split("\x00") if "ask-101-2" in p]
    assert len(prompts) == 1
    p = prompts[0]
    assert p.index("ask-101-1") < p.index("ans ask-101-1") < p.index("ask-101-2")
    assert "<|im_start|>assistant\nans ask-101-1<|im_end|>" in p
    assert p.endswith("<|im_start|>assistant\n")
    # A rerun finds everything done: no method is called again.
    calls = len(_calls(tmp_path))
    assert specbench.main(_args(qfile, out, "--methods", "ar,ar_tweaked,fake_a", "--max-new-tokens", "4")) == 0
    assert len(_calls(tmp_path)) == calls and len(_rows(out)) == 3 * len(ALL_KEYS)


def test_summarize_only_records_methods_a_killed_run_did_not(bench):
    """Runs killed before the per-method record existed left methods without settings or cost;
    --summarize-only builds them again from their labels and the report gets its roofline."""
    tmp_path, qfile = bench
    out = tmp_path / "out"
    assert specbench.main(_args(qfile, out, "--methods", "ar,pld", "--max-new-tokens", "4",
                                "--profile", "h100-sxm")) == 0
    meta = json.loads((out / "run.json").read_text())
    pld_cost = meta["methods"]["pld"]["cost"]
    assert pld_cost["kind"] == "chain" and pld_cost["draft"] == "free"
    del meta["methods"]["pld"], meta["methods"]["ar"]
    (out / "run.json").write_text(json.dumps(meta))
    assert specbench.main(_args(qfile, out, "--summarize-only")) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["methods"]["pld"]["cost"] == pld_cost and meta["methods"]["pld"]["recorded_by"] == "summarize-only"
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert "speedup" in summary["methods"]["pld"]["predicted"]


def test_merge_adds_another_machines_rows_and_refuses_other_settings(bench):
    """A run continued elsewhere: --merge adds its rows, sessions and method records; rows
    already in --out stay as they are; a folder made with other settings is refused untouched."""
    tmp_path, qfile = bench
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert specbench.main(_args(qfile, a, "--methods", "ar", "--max-new-tokens", "4")) == 0
    assert specbench.main(_args(qfile, b, "--methods", "ar,fake_a", "--max-new-tokens", "4")) == 0
    a_ar = {(r["question_id"], r["turn"]): r for r in _rows(a)}
    assert specbench.main(_args(qfile, a, "--merge", str(b), "--max-new-tokens", "4")) == 0
    rows = _rows(a)
    assert len(rows) == 2 * len(ALL_KEYS)
    assert {(r["question_id"], r["turn"]): r for r in rows if r["method"] == "ar"} == a_ar  # kept, not replaced
    meta = json.loads((a / "run.json").read_text())
    assert set(meta["methods"]) == {"ar", "fake_a"} and len(meta["sessions"]) == 2
    assert {r["session"] for r in rows} == {s["session"] for s in meta["sessions"]}
    summary = json.loads((a / "summary.json").read_text())["summary"]
    assert set(summary["methods"]) == {"ar", "fake_a"}
    # Merging again adds nothing.
    assert specbench.main(_args(qfile, a, "--merge", str(b), "--max-new-tokens", "4")) == 0
    assert len(_rows(a)) == 2 * len(ALL_KEYS)
    assert len(json.loads((a / "run.json").read_text())["sessions"]) == 2
    # Other settings: refused, nothing written.
    assert specbench.main(_args(qfile, c, "--methods", "fake_a", "--max-new-tokens", "8")) == 0
    before = (a / "results.jsonl").read_text()
    assert specbench.main(_args(qfile, a, "--merge", str(c), "--max-new-tokens", "4")) == 2
    assert (a / "results.jsonl").read_text() == before


def test_other_settings_are_refused_in_the_same_directory(bench):
    tmp_path, qfile = bench
    out = tmp_path / "out"
    assert specbench.main(_args(qfile, out, "--methods", "fake_a", "--max-new-tokens", "8")) == 0
    assert specbench.main(_args(qfile, out, "--methods", "fake_a", "--max-new-tokens", "16")) == 2
    assert specbench.main(_args(qfile, out, "--methods", "fake_a", "--temperature", "0.7",
                                "--max-new-tokens", "8")) == 2
    assert len(_rows(out)) == len(ALL_KEYS)
    # The label "fake_a" must keep meaning the same options, even if the defaults change.
    original = methods.registered()["fake_a"]
    try:
        methods.register(dataclasses.replace(original, defaults={"knob": 2}), replace=True)
        assert specbench.main(_args(qfile, out, "--methods", "fake_a", "--max-new-tokens", "8")) == 2
    finally:
        methods.register(original, replace=True)


def test_batching_by_category_or_mixed(bench):
    """Category batches hold one category and turn; mixed ones are filled to the batch size
    (turns still apart: a turn-2 prompt needs the method's own turn-1 answer). The report says
    how full the batches were, and a run is not resumed with the other batching."""
    tmp_path, qfile = bench
    sizes = {}
    for batching in ("category", "mixed"):
        out = tmp_path / batching
        assert specbench.main(_args(qfile, out, "--methods", "fake_a", "--batch-size", "3",
                                    "--batching", batching)) == 0
        rows = _rows(out)
        sizes[batching] = sorted(r["batch_size"] for r in rows)
        if batching == "category":
            assert len({(r["category"], r["turn"]) for r in rows if r["batch_size"] == 3}) == 1
        md = (out / "summary.md").read_text()
        per_call = len(rows) / sum(1 / b for b in sizes[batching])
        assert f"- batch size: 3 ({batching} batches: {per_call:.1f} rows per call on average)" in md
    # turn 1: writing 2, qa 4, translation 2 -> 2 | 3 + 1 | 2 by category, 3 + 3 + 2 mixed; turn 2: 2
    assert sizes["category"] == sorted([2, 2, 3, 3, 3, 1, 2, 2, 2, 2])
    assert sizes["mixed"] == sorted([3, 3, 3, 3, 3, 3, 2, 2, 2, 2])
    assert specbench.main(_args(qfile, tmp_path / "category", "--methods", "fake_a", "--batch-size", "3",
                                "--batching", "mixed")) == 2


def test_a_failing_method_is_recorded_and_the_others_still_run(bench, capsys):
    tmp_path, qfile = bench
    out = tmp_path / "out"
    assert specbench.main(_args(qfile, out, "--methods", "fake_a,fake_fail,fake_b", "--baseline", "fake_a")) == 1
    assert {r["method"] for r in _rows(out)} == {"fake_a", "fake_b"}
    summary = json.loads((out / "summary.json").read_text())
    assert [e["method"] for e in summary["errors"]] == ["fake_fail"]
    assert "this method always fails" in (out / "summary.md").read_text()
    assert "method fake_fail failed" in capsys.readouterr().err


def test_damaged_results_are_reported_not_overwritten(bench, capsys):
    tmp_path, qfile = bench
    out = tmp_path / "out"
    assert specbench.main(_args(qfile, out, "--methods", "fake_a")) == 0
    results = out / "results.jsonl"
    damaged = results.read_bytes() + b'{"schema": 1, "method": "fake_b", "question_id": 10'
    results.write_bytes(damaged)
    capsys.readouterr()
    assert specbench.main(_args(qfile, out, "--methods", "fake_a,fake_b")) == 3
    err = capsys.readouterr().err
    assert "incomplete line" in err and "--repair" in err
    assert results.read_bytes() == damaged
    results.write_bytes(b"not json at all\n" + damaged)
    assert specbench.main(_args(qfile, out, "--methods", "fake_a,fake_b")) == 3
    assert "line 1: not JSON" in capsys.readouterr().err
    assert specbench.main(_args(qfile, out, "--methods", "fake_a,fake_b", "--repair")) == 0
    assert (out / "results.jsonl.bak").read_bytes() == b"not json at all\n" + damaged
    rows = _rows(out)
    keys = {(r["method"], r["question_id"], r["turn"]) for r in rows}
    assert len(rows) == len(keys) == 2 * len(ALL_KEYS)


# --------------------------------------------------------------------------------------------
# Killed mid-run, then restarted
# --------------------------------------------------------------------------------------------


def _complete_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = path.read_bytes()
    return [json.loads(x) for x in data[: data.rfind(b"\n") + 1].splitlines()]


def test_sigkill_then_restart_loses_and_recomputes_nothing(bench):
    tmp_path, qfile = bench
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]), FAKE_DELAY="0.1",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.specbench", *_args(qfile, out, "--methods", "fake_a,fake_b")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 60
    while len(_complete_lines(results)) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = _complete_lines(results)
    assert 5 <= len(before) < 2 * len(ALL_KEYS)
    # the method in flight was recorded when it was built, not only at the end of the session
    killed_meta = json.loads((out / "run.json").read_text())
    assert killed_meta["methods"]["fake_a"]["options"] == {"knob": 1}

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode == 3:  # killed in the middle of a write: the user is told to --repair
        assert "--repair" in done.stderr
        done = subprocess.run(cmd + ["--repair"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    after = _rows(out)
    keys = [(r["method"], r["question_id"], r["turn"]) for r in after]
    assert len(keys) == len(set(keys)) == 2 * len(ALL_KEYS)  # nothing missing, nothing twice
    assert set(keys) == {(m, q, t) for m in ("fake_a", "fake_b") for q, t in ALL_KEYS}
    by_key = {k: r for k, r in zip(keys, after)}
    for r in before:  # every row saved before the kill is kept as it was
        assert by_key[(r["method"], r["question_id"], r["turn"])] == r
    assert len({r["session"] for r in after}) == 2

    counts = {}
    for line in _calls(tmp_path):
        label, marker = line.split()
        if marker != "warmup":
            _, q, t = marker.split("-")
            key = (label, int(q), int(t))
            counts[key] = counts.get(key, 0) + 1
    for r in before:  # nothing that was saved was computed again
        assert counts[(r["method"], r["question_id"], r["turn"])] == 1
    assert sum(counts.values()) <= 2 * len(ALL_KEYS) + 1  # at most the call in flight at the kill
