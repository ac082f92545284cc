"""What a Spec-Bench run is given: its settings (`BenchConfig`), the models and tokenizer its
methods share (`BenchEnv`), and the prompt of each (question, turn)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from .. import questions as qmod
from ..method_base import MethodUnavailable

RESULTS_DIR = qmod.REPO_ROOT / "experiments" / "results" / "specbench"
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


@dataclasses.dataclass
class BenchConfig:
    target: str = DEFAULT_TARGET
    draft: str | None = DEFAULT_DRAFT
    dtype: str = "bfloat16"
    methods: Sequence[str] = ()
    baseline: str = "ar"
    questions: str | None = None
    subset: str = "all"
    per_category: int | None = None
    categories: Sequence[str] | None = None
    question_ids: Sequence[int] | None = None
    first_turn_only: bool = False
    max_new_tokens: int = 256
    batch_size: int = 1
    batching: str = "category"
    prompt_bucket: int = 0
    phase_times: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    chat: bool = True
    out: str | None = None
    repair: bool = False
    profile: str = "auto"
    fail_fast: bool = False
    progress: bool = True
    tuned_on: str | None = None  # subset the methods' settings were tuned on: the report adds held-out figures

    @property
    def sampling_settings(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampling_text(self) -> str:
        if self.greedy:
            return "greedy"
        return f"temperature {self.temperature}, top_k {self.top_k}, top_p {self.top_p}, seed {self.seed}"

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = Path(self.target).stem if ("/" in self.target or self.target.endswith(".gguf")) else self.target
        parts = [name, self.subset]
        if self.per_category:
            parts.append(f"pc{self.per_category}")
        parts.append("greedy" if self.greedy else f"t{self.temperature}")
        parts += [f"{self.max_new_tokens}tok", f"b{self.batch_size}"]
        return RESULTS_DIR / "_".join(parts)

    def identity(self, questions_sha: str, device_kind: str) -> dict:
        """What the stored rows depend on: a resumed run must match it."""
        return {
            "target": self.target, "draft": self.draft, "dtype": self.dtype, "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size, "sampling": self.sampling_settings, "seed": self.seed,
            "chat": self.chat, "questions_sha256": questions_sha, "device_kind": device_kind,
            # named only when not the default, so runs stored before the option still resume
            **({"batching": self.batching} if self.batching != "category" else {}),
        }


class BenchEnv:
    """The models, tokenizer and settings shared by the methods of a run (loaded on demand)."""

    def __init__(self, cfg: BenchConfig):
        from .. import toy

        self.target_source, self.draft_source = cfg.target, cfg.draft
        self.dtype = cfg.dtype
        self.max_new_tokens = cfg.max_new_tokens
        self.prompt_bucket = cfg.prompt_bucket or None
        self.sampling_settings = cfg.sampling_settings
        self.is_toy = cfg.target in toy.TOY_NAMES
        self._target = self._draft = None
        self._tokenizer = toy.ByteTokenizer() if self.is_toy else None

    def _load(self, source):
        from .. import toy

        if source in toy.TOY_NAMES:
            return toy.load_toy(source)
        import jax.numpy as jnp

        import decoding

        return decoding.load(source, dtype=getattr(jnp, self.dtype))

    @property
    def target(self):
        if self._target is None:
            self._target = self._load(self.target_source)
        return self._target

    @property
    def draft(self):
        if self.draft_source is None:
            raise MethodUnavailable("this method needs a draft model: pass --draft NAME_OR_PATH.")
        if self._draft is None:
            self._draft = self._load(self.draft_source)
        return self._draft

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.target.tokenizer
            if self._tokenizer is None:
                raise ValueError(f"the target {self.target_source!r} was loaded without a tokenizer; the benchmark "
                                 "needs one to apply the chat template.")
        return self._tokenizer

    def loaded_configs(self) -> dict:
        out = {}
        if self._target is not None:
            out["target_config"] = dataclasses.asdict(self._target.config)
        if self._draft is not None:
            out["draft_config"] = dataclasses.asdict(self._draft.config)
        return out

    def sampling(self):
        import decoding

        return decoding.make_sampling(**self.sampling_settings)

    def eos_ids(self) -> tuple:
        from decoding.generation import default_eos_ids

        return default_eos_ids(self.tokenizer)


def default_draft(target: str) -> str | None:
    """The draft paired with a target when --draft is not given: the 0.5B for the default
    1.5B target, toy-draft for the toy; none otherwise."""
    return {DEFAULT_TARGET: DEFAULT_DRAFT, "toy": "toy-draft"}.get(target)


def draft_from_arg(target: str, draft: str | None) -> str | None:
    if draft is None:
        return default_draft(target)
    return None if draft in ("none", "") else draft


def _chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def build_prompt(tokenizer, item: qmod.WorkItem, previous_answers: Sequence[str], chat: bool = True) -> list[int]:
    """Token ids of `item`'s turn: earlier turns with the method's own answers, then this turn."""
    turns = item.question.turns[: item.turn]
    if len(previous_answers) != item.turn - 1:
        raise ValueError(f"turn {item.turn} needs {item.turn - 1} earlier answer(s), got {len(previous_answers)}.")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the target's tokenizer has no chat template (a base model?); pass --no-chat.")
        messages = []
        for i, text in enumerate(turns):
            messages.append({"role": "user", "content": text})
            if i < len(previous_answers):
                messages.append({"role": "assistant", "content": previous_answers[i]})
        return _chat_ids(tokenizer, messages)
    pieces = []
    for i, text in enumerate(turns):
        pieces.append(text)
        if i < len(previous_answers):
            pieces.append(previous_answers[i])
    return [int(t) for t in tokenizer.encode("\n\n".join(pieces) + "\n\n", add_special_tokens=True)]
