"""transformers as a peer, on the same weights and prompts as the JAX methods.

Three modes, each a method of the registry:
  * hf_ar        `model.generate(...)`, eager PyTorch, dynamic cache: transformers' default;
  * hf_assisted  assisted generation, `generate(..., assistant_model=draft)` (transformers'
                 speculative decoding; batch 1 only, so a batch is run row by row);
  * hf_static    the fair compiled peer: `generate(...)` with a static cache
                 (`generation_config.cache_implementation = "static"`), which makes transformers
                 compile its own decode step automatically (`generation_config.compile_config`:
                 `torch.compile(..., fullgraph=True, mode="reduce-overhead")`, CUDA graphs
                 included). The library's own path is used, not a hand-compiled `model.forward`:
                 `generate` keeps reading the logits of the previous call, which CUDA graphs
                 overwrite unless `generate` itself manages them (the failure "accessing tensor
                 output of CUDAGraphs that has been overwritten"). Prompts are left-padded to
                 power-of-two lengths so that a few compiled shapes serve every prompt; each
                 shape is warmed up (compiled and its graphs recorded) before timing. The method's
                 info records how many graphs torch.compile built, so a run that silently fell
                 back to eager says so. When it fails, the run records why.

Models are loaded from the very files the JAX side loads: a registry name or .gguf file with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.bfloat16)`
(transformers dequantizes it), a Hugging Face directory as is; on CUDA when available.

Prompts are the same token ids; EOS ids are the same as `decoding.generate`'s; each row's
tokens are cut after its first EOS (kept, as the JAX side keeps it). Target forwards are
counted with a forward hook, so tau (tokens per target call) is measured for assisted
generation too.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from decoding.shapes import bucket

from .method_base import Generation, Method, MethodUnavailable


def hf_location(source: str) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for a registry name, .gguf path or HF directory."""
    from decoding import registry

    if source in registry.REGISTRY:
        path = registry.fetch(source)
        return str(path.parent), path.name
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    raise MethodUnavailable(
        f"the transformers peers load the same weights as the JAX side, from a registry name, a .gguf "
        f"file or a Hugging Face directory; {source!r} is none of these."
    )


def load_hf_model(source: str, dtype: str, device):
    import torch
    from transformers import AutoModelForCausalLM

    directory, gguf_file = hf_location(source)
    kwargs = {"dtype": getattr(torch, dtype)}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    return model.to(device).eval()


class _Counter:
    """Counts forward calls of a module through a forward hook."""

    def __init__(self, module):
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def remove(self):
        self._handle.remove()


def dynamo_graphs() -> int | None:
    """Graphs torch.compile has built so far (to flag a compile inside a timed call)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, AttributeError):
        return None


class HFMethod(Method):
    """One of transformers' generation modes: "ar", "assisted" or "static"."""

    def __init__(self, env, mode: str, options: dict):
        super().__init__(f"hf_{mode}", f"hf_{mode}", options)
        if env.is_toy:
            raise MethodUnavailable("the transformers peers need real weights; the toy target has none.")
        import torch

        self.env, self.mode, self.torch = env, mode, torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cost = {"kind": "ar"} if mode in ("ar", "static") else None
        self.warmup_per_shape = mode == "static"
        t0 = time.perf_counter()
        self.model = load_hf_model(env.target_source, env.dtype, self.device)
        self.assistant = None
        if mode == "assisted":
            if env.draft_source is None:
                raise MethodUnavailable("hf_assisted needs a draft model: pass --draft.")
            self.assistant = load_hf_model(env.draft_source, env.dtype, self.device)
            if options.get("tokens"):
                self.assistant.generation_config.num_assistant_tokens = int(options["tokens"])
        self.load_s = time.perf_counter() - t0
        self.compile_mode = None
        if mode == "static":
            self.model.generation_config.cache_implementation = "static"
            config = getattr(self.model.generation_config, "compile_config", None)
            self.compile_mode = ("transformers' automatic compile of the decode step"
                                 + (f" ({config.to_dict()})" if hasattr(config, "to_dict") else ""))
        self.target_calls = _Counter(self.model)
        self.draft_calls = _Counter(self.assistant) if self.assistant is not None else None
        self.eos = list(env.eos_ids())
        tok = env.tokenizer
        self.pad_id = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else self.eos[0]

    def info(self):
        d = super().info()
        d.update(device=str(self.device), load_s=self.load_s, compile=self.compile_mode,
                 compiled_graphs=dynamo_graphs() if self.mode == "static" else None,
                 torch_device_name=(self.torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu"))
        if self.assistant is not None:
            d["assistant"] = self._assistant_settings()
        return d

    def _assistant_settings(self) -> dict:
        """The assistant's drafting schedule, with transformers' defaults filled in where unset."""
        gc_ = self.assistant.generation_config
        keys = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
        out = {k: getattr(gc_, k, None) for k in keys}
        try:
            defaults = gc_._get_default_generation_params()
        except AttributeError:  # older transformers keep the defaults on the config itself
            defaults = {}
        return {k: (v if v is not None else defaults.get(k)) for k, v in out.items()}

    def _sampling_kwargs(self) -> dict:
        s = self.env.sampling_settings
        if s["temperature"] == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": s["temperature"], "top_k": s["top_k"], "top_p": s["top_p"]}

    def _batch(self, prompts):
        torch = self.torch
        width = max(len(p) for p in prompts)
        if self.mode == "static":
            width = bucket(width)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as decoder-only generate expects
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device), width

    def _cut(self, row: list[int]) -> list[int]:
        for i, t in enumerate(row):
            if t in self.eos:
                return row[: i + 1]
        return row

    def _call(self, prompts, seed):
        torch = self.torch
        ids, mask, width = self._batch(prompts)
        kwargs = dict(max_new_tokens=self.env.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad_id,
                      **self._sampling_kwargs())
        if self.assistant is not None:
            kwargs["assistant_model"] = self.assistant
        torch.manual_seed(seed)
        before, graphs = self.target_calls.calls, dynamo_graphs()
        drafts = self.draft_calls.calls if self.draft_calls else 0
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        run_s = time.perf_counter() - t0
        rows = [self._cut(r) for r in out[:, width:].tolist()]
        forwards = self.target_calls.calls - before
        if self.mode == "static":
            # the compiled call runs the module's hooks inside the graph, so count steps instead:
            # one forward (prefill, then one decode step) per generated position of the batch
            forwards = int(out.shape[1] - width)
        extra = {}
        if self.draft_calls is not None:
            extra["draft_forwards"] = self.draft_calls.calls - drafts
        after = dynamo_graphs()
        if graphs is not None and after is not None and after > graphs:
            extra["compiled_during_call"] = after - graphs
        return rows, run_s, forwards, extra

    def generate(self, prompts, seed):
        if self.mode != "assisted":
            rows, run_s, forwards, extra = self._call(prompts, seed)
            row_forwards = None
        else:  # assisted generation supports batch 1 only: run the rows one by one
            rows, run_s, row_forwards, extra = [], 0.0, [], {}
            for p in prompts:
                r, t, f, e = self._call([p], seed)
                rows += r
                run_s += t
                row_forwards.append(f)
                for k, v in e.items():
                    extra[k] = extra.get(k, 0) + v
            forwards = sum(row_forwards)
        texts = [self.env.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        n = sum(len(r) for r in rows)
        tau = (n / forwards if row_forwards else n / len(rows) / forwards) if forwards else None
        return Generation(tokens=rows, texts=texts, run_s=run_s, target_forwards=forwards, tau=tau, extra=extra,
                          row_forwards=row_forwards)

    def warmup(self, prompts, seed):
        t0 = time.perf_counter()
        self.generate(prompts, seed)
        if self.mode == "static":  # CUDA graphs are recorded on the calls after compilation
            self.generate(prompts, seed)
        return time.perf_counter() - t0

    def close(self):
        self.target_calls.remove()
        if self.draft_calls is not None:
            self.draft_calls.remove()
        self.model = self.assistant = None
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
