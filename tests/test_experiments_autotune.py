"""The autotuning script: statistics of the harness's generations, the tuning/report split and
the command line on the toy pair."""

import pytest

from decoding import autotune
from experiments import autotune as experiments_autotune


def test_calibration_statistics_add_up_over_prompts():
    from experiments.methods import Generation

    gens = [Generation(tokens=[[1] * 6], texts=[""], run_s=1.0, target_forwards=3,
                       extra={"accept_histogram": [1, 0, 1], "rounds": 2}),
            Generation(tokens=[[1] * 4], texts=[""], run_s=1.0, target_forwards=3,
                       extra={"accept_histogram": [1, 1], "rounds": 2})]
    stats = autotune.aggregate([experiments_autotune.generation_run(g) for g in gens])
    assert stats["accept_histogram"] == [2, 1, 1] and stats["rounds"] == 4
    assert stats["tau"] == pytest.approx(10 / 6) and stats["tokens_per_s"] == pytest.approx(5.0)
    assert autotune.chain_reach(stats, 2) == pytest.approx([0.5, 0.25])


def result_prompts(record):
    return record["result"]["prompts"]


def _items(*pairs):
    from experiments.questions import Question, WorkItem

    return [WorkItem(Question(qid, cat, ("a", "b")), turn) for qid, cat, turn in pairs]


def test_tuning_prompts_are_spread_over_categories():
    items = _items((1, "x", 1), (2, "x", 1), (3, "y", 1), (4, "z", 1), (5, "y", 1), (1, "x", 2))
    assert [it.question_id for it in experiments_autotune.spread(items, 4)] == [1, 3, 4, 2]
    assert [it.question_id for it in experiments_autotune.spread(items, 9)] == [1, 3, 4, 2, 5]


def test_a_report_subset_sharing_a_tuning_question_is_refused():
    tuning = _items((81, "writing", 1), (91, "roleplay", 1))
    experiments_autotune.check_disjoint(tuning, _items((82, "writing", 1)), "mine")
    with pytest.raises(experiments_autotune.OverlapError, match=r"shares question\(s\) \[91\]"):
        experiments_autotune.check_disjoint(tuning, _items((91, "roleplay", 2), (82, "writing", 1)), "mine")


def test_the_command_line_refuses_overlapping_sets(tmp_path, capsys):
    from experiments import questions

    if not questions.DEFAULT_QUESTIONS.is_file():
        pytest.skip(f"{questions.DEFAULT_QUESTIONS} is absent (the shared data folder is not mounted)")
    code = experiments_autotune.main(["--target", "toy", "--tune-subset", "reference16", "--tune-categories", "",
                                      "--report-subset", "reference16", "--out", str(tmp_path)])
    assert code == 2 and "shares question(s)" in capsys.readouterr().err
    assert not (tmp_path / "autotune.json").exists()


def test_the_command_line_on_the_toy_pair(tmp_path):
    """End to end through the benchmark's methods: calibration, candidates, measured top two,
    the baseline, and the files a report is made from (one program per setting: prompts padded
    to the bucket)."""
    import json

    from decoding import generation
    from experiments import questions

    if not questions.DEFAULT_QUESTIONS.is_file():
        pytest.skip(f"{questions.DEFAULT_QUESTIONS} is absent (the shared data folder is not mounted)")
    before = generation.compile_count()
    code = experiments_autotune.main(["--method", "spec", "--target", "toy", "--draft", "toy-draft", "--gammas", "1-3",
                          "--max-new-tokens", "6", "--prompt-bucket", "1024", "--profile", "h100-sxm",
                          "--out", str(tmp_path)])
    assert code == 0
    record = json.loads((tmp_path / "autotune.json").read_text())
    assert record["config"]["prompt_bucket"] == 1024
    tuning = record["config"]["tuning"]
    assert tuning["count"] == 4 == len(tuning["questions"]) and tuning["sha256"] == result_prompts(record)["sha256"]
    reference = {f"{it.question_id}/turn1" for it in questions.select(questions.load_questions(), "reference16")}
    assert not reference & set(tuning["questions"]) and record["config"]["report_subset"] == "reference16"
    result = record["result"]
    assert result["calibration_settings"] == {"gamma": 3}
    measured = [c for c in result["candidates"] if c["measured_tokens_per_s"] is not None]
    assert len(measured) == 2 and result["choice"]["settings"] in [c["settings"] for c in measured]
    # calibration (gamma 3) + the two measured settings (gamma 3 at most once) + the baseline:
    # one program each, whatever the four prompts' lengths
    programs = 1 + len({json.dumps(c["settings"]) for c in measured} - {json.dumps({"gamma": 3})}) + 1
    assert generation.compile_count() - before == programs
    assert "| settings |" in (tmp_path / "autotune.md").read_text()
