"""distill.data: the loss mask covers assistant tokens only, packing keeps sequences apart,
batches are a pure function of the step, and bad data is a clear error."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from distill import data as D
from test_distill_models import CONVERSATIONS, tokenizer


def test_assistant_mask_is_exactly_the_assistant_turns():
    tok = tokenizer()
    messages = CONVERSATIONS[-1]  # two user and two assistant turns
    row = D.render_messages(tok, messages, max_len=10_000)
    ids, mask = np.asarray(row["input_ids"]), np.asarray(row["assistant_mask"], bool)
    assert ids.tolist() == D.chat_ids(tok, messages, add_generation_prompt=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # the masked runs decode to each assistant answer followed by its end-of-turn token
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
    assert all(r[-1] == im_end for r in runs)
    # nothing of the user turns, the role headers or the template newline is masked
    unmasked = tok.decode(ids[~mask].tolist())
    for m in messages:
        if m["role"] == "user":
            assert m["content"] in unmasked
    assert unmasked.count("<|im_start|>assistant\n") == 2


def test_packing_shifts_the_mask_and_keeps_sequences_apart():
    tok = tokenizer()
    rows = [D.render_messages(tok, m, 10_000) for m in CONVERSATIONS[:6]]
    seq_len = 2 * max(len(r["input_ids"]) for r in rows)
    packed = D.pack_rows(rows, seq_len)
    assert len(packed["tokens"]) < len(rows)  # several sequences share a row
    flat_rows = iter(rows)
    for tokens, positions, segments, loss in zip(*(packed[k] for k in D.BATCH_KEYS)):
        for s in range(1, segments.max() + 1):
            where = np.flatnonzero(segments == s)
            row = next(flat_rows)
            assert tokens[where].tolist() == row["input_ids"]
            assert positions[where].tolist() == list(range(len(where)))
            # loss at t <=> token t + 1 is an assistant token of the same sequence
            assert loss[where][:-1].tolist() == row["assistant_mask"][1:]
            assert loss[where][-1] == 0
        assert np.all(loss[segments == 0] == 0)


def test_batches_depend_only_on_seed_and_step():
    tok = tokenizer()
    ds = D.render(datasets.Dataset.from_dict({"messages": CONVERSATIONS}), tok, max_len=96)
    packed = D.pack(ds, 96)
    a, b = D.Batches(packed, 2, accumulate=3, seed=5), D.Batches(packed, 2, accumulate=3, seed=5)
    for step in (7, 0, 3, 7, b.steps_per_epoch + 1):
        x, y = a.batch(step), b.batch(step)
        assert x["tokens"].shape == (3, 2, 96)
        for k in D.BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    # an epoch visits every packed row once
    seen = np.concatenate([a.indices(s) for s in range(a.steps_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == a.steps_per_epoch * 6
    assert not np.array_equal(D.Batches(packed, 2, 3, seed=6).indices(0), a.indices(0))


def test_empty_and_all_masked_data_are_clear_errors():
    tok = tokenizer()
    with pytest.raises(D.DataError, match="empty"):
        D.render(datasets.Dataset.from_dict({"messages": []}), tok, max_len=64)
    only_users = [[{"role": "user", "content": "hello"}]]
    with pytest.raises(D.DataError, match="masked out"):
        D.render(datasets.Dataset.from_dict({"messages": only_users}), tok, max_len=64)
    # answers beyond the length limit: every row is masked out
    with pytest.raises(D.DataError, match="raise max_len"):
        D.render(datasets.Dataset.from_dict({"messages": CONVERSATIONS[:3]}), tok, max_len=8)


def test_evaluation_sets_are_refused(tmp_path):
    for name in ("spec_bench/question.jsonl", "gsm8k/test.jsonl"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"messages": []}\n')
        with pytest.raises(D.DataError, match="never train on what is reported"):
            D.load_conversations(str(path))


def test_gsm8k_train_renders_with_calculator_notes_removed():
    if not (D.data_root() / D.SOURCES["gsm8k"]).is_file():
        pytest.skip(f"the shared data folder {D.data_root()} is absent (set DISTILL_DATA)")
    ds = D.load_conversations("gsm8k", limit=5)
    assert len(ds) == 5
    for e in ds:
        assert [m["role"] for m in e["messages"]] == ["user", "assistant"]
        assert "<<" not in e["messages"][1]["content"] and "####" in e["messages"][1]["content"]
