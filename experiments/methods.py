"""The methods a benchmark can run, described by small specs: name -> how to build it.

A method is written on the command line as `NAME` or `NAME:key=value:key=value`, e.g.
`spec:gamma=6`. Its *label* (the key of its result rows) is the name followed by the options
that differ from the defaults, in sorted order, so `spec:gamma=4` and `spec` are one method.

Built-in methods (the core strategies are imported only when a method asks for them, and a
missing one gives a clear error before any work starts):
  ar         decoding.Autoregressive()                                   cost: 1 target call/token
  spec       decoding.Speculative(drafting.DraftModel(), gamma, confidence)  + the --draft model
  tree       decoding.TreeDecoding(drafting.DraftModel(),
                 tree=drafting.DynamicTree(depth, top_k, total_tokens))  + the --draft model
  pld        decoding.Speculative(drafting.PromptLookup(max_ngram), gamma)
  layerskip  decoding.Speculative(drafting.LayerSkip(layers), gamma)     (0 = half the layers)
  ht         hidden transfer (drafting.HiddenTransfer, maps=PATH)
  medusa     Medusa heads (drafting.Medusa, heads=PATH)
  eagle      the EAGLE-3-style head (drafting.Eagle, head=PATH)
             each drafts a static tree with tree=4-2-2 (children per depth), else a dynamic tree
             when depth > 0 (top_k, nodes; eagle's default), else a chain of gamma
  hf_ar, hf_assisted, hf_static: transformers peers (see experiments.hf_peers).
The draft model's weights reach `decoding.generate` through its `draft=` argument.

Every core method also takes three switches (`SWITCHES`), each unset by default, so one run
compares a method with and without them:
  * `graphs=`: `ar:graphs=while` runs the whole-generation program as a CUDA graph
    (`decoding.Options.command_buffers`), e.g. `--methods ar,spec,ar:graphs=while,spec:graphs=while`;
  * `attention=xla|pallas`: the attention of the target and of a draft model
    (`decoding.Options.attention`), e.g. `--methods ar,ar:attention=pallas,spec:attention=pallas`;
  * `projections=xla|pallas`: the fused projection kernels of `decoding.kernels.projection`
    (`decoding.Options.projections`), e.g. `--methods ar,ar:projections=pallas`.

Other methods can be added from a module: `--plugin my.module` imports it, and it calls
`register(MethodSpec(...))`.

Each method also declares its roofline cost (`decoding.roofline.predict`), so a report can
put the predicted speedup next to the measured one.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable, Sequence

from .method_base import Generation, Method, MethodUnavailable  # noqa: F401  (re-exported: methods.Generation, ...)


class MethodSpecError(ValueError):
    """A method string names an unknown method or option, or an option has a bad value."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How to build a method. `build(env, options) -> Method`; `check()` raises
    `MethodUnavailable` when the method cannot run here (called before any work starts)."""

    name: str
    description: str
    build: Callable[[Any, dict], Method]
    defaults: dict = dataclasses.field(default_factory=dict)
    check: Callable[[], None] | None = None
    uses_draft_model: bool = False
    uses_torch: bool = False


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A method string, resolved: its label, spec and full options."""

    label: str
    spec: MethodSpec
    options: dict

    def build(self, env) -> Method:
        method = self.spec.build(env, dict(self.options))
        method.label = self.label
        return method


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add a method spec to the registry (a plugin module calls this on import)."""
    if spec.name in _REGISTRY and not replace:
        raise MethodSpecError(f"a method named {spec.name!r} is already registered.")
    if not spec.name or any(c in spec.name for c in ":,= "):
        raise MethodSpecError(f"method names cannot be empty or contain ':', ',', '=' or spaces: {spec.name!r}.")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> dict[str, MethodSpec]:
    return dict(_REGISTRY)


def load_plugin(module: str) -> None:
    """Import a module that registers extra methods."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise MethodSpecError(f"could not import plugin module {module!r}: {err}.") from err


def _convert(value: str, default: Any, where: str):
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise MethodSpecError(f"{where}: expected true/false, got {value!r}.")
    try:
        return type(default)(value) if default is not None else value
    except ValueError:
        raise MethodSpecError(f"{where}: expected a {type(default).__name__}, got {value!r}.") from None


def label_of(name: str, options: dict, defaults: dict) -> str:
    changed = [f"{k}={options[k]}" for k in sorted(options) if options[k] != defaults.get(k)]
    return ":".join([name, *changed])


def parse(item: str) -> Resolved:
    """'spec:gamma=6' -> Resolved(label, spec, options) (options merged over the defaults)."""
    name, *parts = item.strip().split(":")
    if name not in _REGISTRY:
        raise MethodSpecError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))} "
                              "(others can be added with --plugin MODULE).")
    spec = _REGISTRY[name]
    options = dict(spec.defaults)
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise MethodSpecError(f"method {item!r}: options are written key=value, got {part!r}.")
        if key not in spec.defaults:
            known = ", ".join(sorted(spec.defaults)) or "none"
            raise MethodSpecError(f"method {item!r}: unknown option {key!r}; {name} takes: {known}.")
        options[key] = _convert(value, spec.defaults[key], f"method {item!r}, option {key}")
    if options.get("graphs"):
        _check_graphs(item, options["graphs"])
    for switch in ("attention", "projections"):
        if options.get(switch) not in (None, "", "xla", "pallas"):
            raise MethodSpecError(f"method {item!r}: {switch}={options[switch]!r} is not 'xla' or 'pallas' "
                                  f"(leave it out for the library's default, decoding.Options().{switch}).")
    return Resolved(label_of(name, options, spec.defaults), spec, options)


def resolve(items: Sequence[str], *, check: bool = True) -> list[Resolved]:
    """Parse a list of method strings (each may hold several, comma-separated) and check each
    can run here; duplicate labels are an error."""
    out, seen = [], set()
    for chunk in items:
        for item in chunk.split(","):
            if not item.strip():
                continue
            r = parse(item)
            if r.label in seen:
                raise MethodSpecError(f"method {r.label!r} is listed twice.")
            seen.add(r.label)
            if check and r.spec.check is not None:
                r.spec.check()
            out.append(r)
    if not out:
        raise MethodSpecError("no methods given.")
    return out


# --------------------------------------------------------------------------------------------
# The core's strategies (imported lazily)
# --------------------------------------------------------------------------------------------


def _attr(module: str, name: str, method: str):
    """`module.name`, or a MethodUnavailable that says what is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise MethodUnavailable(
            f"method {method!r} needs {module}.{name}, but {module} cannot be imported: {err}.") from err
    obj = getattr(mod, name, None)
    if obj is None:
        raise MethodUnavailable(
            f"method {method!r} needs {module}.{name}, which {module} does not define (was it renamed or moved? "
            f"update experiments/methods.py). Run the methods that exist, e.g. --methods ar.")
    return obj


def needs(*paths: str, method: str) -> Callable[[], None]:
    """A `MethodSpec.check` that raises `MethodUnavailable` unless every "module.name" in `paths` exists."""
    def check() -> None:
        for path in paths:
            module, _, name = path.rpartition(".")
            _attr(module, name, method)
    return check


def _jsonable(value):
    """Stats.extra values -> JSON-friendly Python (arrays to lists, numpy scalars to numbers)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; e.g. the acceptance rate of a position never reached
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def _command_buffers(graphs: str) -> str:
    """The `decoding.Options.command_buffers` value a `graphs=` option stands for ('+' joins
    kinds on the command line, where ',' separates methods)."""
    return {"default": "", "while": "while"}.get(graphs, graphs.replace("+", ",").upper())


def _check_graphs(label: str, value: str) -> None:
    """Refuse a `graphs=` value before any model work (XLA would only refuse it at compile time)."""
    from decoding.options import COMMAND_BUFFER_KINDS

    if value in ("", "default", "while"):
        return
    bad = [k for k in value.split("+") if k.upper() not in COMMAND_BUFFER_KINDS]
    if bad:
        raise MethodSpecError(f"method {label!r}: graphs={value!r} is not 'default', 'while' or XLA command "
                              f"buffer kinds joined by '+' (unknown: {', '.join(bad)}; known: "
                              f"{', '.join(COMMAND_BUFFER_KINDS)}).")


class JaxMethod(Method):
    """A strategy of the core run through `decoding.generate` on the run's target model.

    The `graphs`, `attention` and `projections` options become the `decoding.Options` passed to `generate`
    (static, part of the compile key), so methods with and without them share one process.
    """

    def __init__(self, label, name, options, env, strategy, *, draft_model=None, cost=None):
        super().__init__(label, name, options)
        self.env, self.strategy, self.draft_model, self.cost = env, strategy, draft_model, cost

    def _options(self):
        """The `decoding.Options` this method's `graphs=`, `attention=` and `projections=` options ask for."""
        from decoding import Options

        kw = {}
        if self.options.get("graphs"):
            kw["command_buffers"] = _command_buffers(self.options["graphs"])
        for switch in ("attention", "projections"):
            if self.options.get(switch):
                kw[switch] = self.options[switch]
        return Options(**kw)

    def generate(self, prompts, seed):
        import decoding

        res = decoding.generate(self.env.target, prompts, strategy=self.strategy, sampling=self.env.sampling(),
                                max_new_tokens=self.env.max_new_tokens, seed=seed, draft=self.draft_model,
                                prompt_bucket=getattr(self.env, "prompt_bucket", None), options=self._options())
        st = res.stats
        return Generation(tokens=[list(map(int, t)) for t in res.tokens], texts=list(res.texts), run_s=st.run_s,
                          compile_s=st.compile_s, target_forwards=int(st.target_forwards), tau=float(st.tau),
                          extra=_jsonable({k: v for k, v in st.extra.items() if k != "tau"}),
                          row_forwards=list(st.forwards_per_row) or None)

    def warmup(self, prompts, seed):
        return self.generate(prompts, seed).compile_s

    def phase_times(self, prompts) -> dict | None:
        """Milliseconds of propose / verify / accept+commit (speculative strategies only)."""
        if not hasattr(self.strategy, "propose"):
            return None
        from decoding.profiling import phase_times

        return phase_times(self.env.target, prompts, self.strategy, draft=self.draft_model,
                           sampling=self.env.sampling(), max_new_tokens=self.env.max_new_tokens,
                           prompt_bucket=getattr(self.env, "prompt_bucket", None), options=self._options())

    def info(self):
        d = super().info()
        d["strategy"] = repr(self.strategy)
        return d


def _build_ar(env, opts):
    import decoding

    return JaxMethod("ar", "ar", opts, env, decoding.Autoregressive(), cost={"kind": "ar"})


def _build_spec(env, opts):
    speculative = _attr("decoding", "Speculative", "spec")
    drafter = _attr("drafting", "DraftModel", "spec")()
    confidence = opts["confidence"] or None  # 0: draft all gamma tokens
    return JaxMethod("spec", "spec", opts, env, speculative(drafter, gamma=opts["gamma"], confidence=confidence),
                     draft_model=env.draft, cost={"kind": "chain", "gamma": opts["gamma"], "draft": "model"})


def _build_tree(env, opts):
    tree_decoding = _attr("decoding", "TreeDecoding", "tree")
    drafter = _attr("drafting", "DraftModel", "tree")()
    tree = _attr("drafting", "DynamicTree", "tree")(depth=opts["depth"], top_k=opts["top_k"],
                                                    total_tokens=opts["nodes"])
    cost = {"kind": "tree", "nodes": opts["nodes"], "depth": opts["depth"],
            "draft_tokens_per_step": opts["top_k"], "draft": "model"}
    return JaxMethod("tree", "tree", opts, env, tree_decoding(drafter, tree=tree), draft_model=env.draft, cost=cost)


def _build_pld(env, opts):
    speculative = _attr("decoding", "Speculative", "pld")
    drafter = _attr("drafting", "PromptLookup", "pld")(max_ngram=opts["ngram"])
    return JaxMethod("pld", "pld", opts, env, speculative(drafter, gamma=opts["gamma"]),
                     cost={"kind": "chain", "gamma": opts["gamma"], "draft": "free"})


def _build_layerskip(env, opts):
    speculative = _attr("decoding", "Speculative", "layerskip")
    layers = opts["layers"] or max(1, env.target.config.num_layers // 2)
    opts = dict(opts, layers=layers)
    drafter = _attr("drafting", "LayerSkip", "layerskip")(layers=layers)
    return JaxMethod("layerskip", "layerskip", opts, env, speculative(drafter, gamma=opts["gamma"]),
                     cost={"kind": "chain", "gamma": opts["gamma"], "draft": {"layers": layers}})


def _feature_shape(opts, method: str):
    """The draft shape of a head/map method: `tree=4-2-2` (branching per depth, a static
    `drafting.TreeTopology`; '-' because ',' separates methods) or, when empty, a chain of `gamma`."""
    if not opts.get("tree"):
        return None
    try:
        branching = tuple(int(b) for b in str(opts["tree"]).split("-"))
    except ValueError:
        raise MethodSpecError(f"method {method!r}: tree={opts['tree']!r} is not branching factors joined by '-', "
                              "e.g. tree=4-2-2.") from None
    return _attr("drafting", "TreeTopology", method).from_branching(branching)


def _file_option(opts, key: str, method: str) -> str:
    path = opts.get(key) or ""
    if not path:
        raise MethodUnavailable(f"method {method!r} needs {key}=PATH (a file written by its trainer, e.g. "
                                "experiments.hidden_transfer).")
    return path


def _build_feature_strategy(method, drafter, opts, cost):
    """A static tree (`tree=`), else a dynamic tree (`depth` > 0, `top_k`, `nodes`), else a chain."""
    shape = _feature_shape(opts, method)
    if shape is None and opts.get("depth"):
        shape = _attr("drafting", "DynamicTree", method)(depth=opts["depth"], top_k=opts["top_k"],
                                                         total_tokens=opts["nodes"])
    if shape is None:
        return _attr("decoding", "Speculative", method)(drafter, gamma=opts["gamma"]), dict(cost, kind="chain-self",
                                                                                           gamma=opts["gamma"])
    cost = dict(cost, kind="tree-self", nodes=shape.num_nodes, depth=shape.max_depth)
    return _attr("decoding", "TreeDecoding", method)(drafter, tree=shape), cost


def _build_ht(env, opts):
    ht = importlib.import_module("drafting.hidden_transfer")
    maps = ht.load_maps(_file_option(opts, "maps", "ht"), env.target)
    if opts["pseudo"] not in ht.PSEUDO_MODES:
        raise MethodSpecError(f"method 'ht': pseudo={opts['pseudo']!r} is not one of {ht.PSEUDO_MODES}.")
    strategy, cost = _build_feature_strategy("ht", ht.HiddenTransfer(pseudo=opts["pseudo"]), opts,
                                             {"draft": {"layer": maps.config.layer, "k": maps.config.num_maps}})
    return JaxMethod("ht", "ht", opts, env, strategy, draft_model=maps, cost=cost)


def _build_medusa(env, opts):
    medusa = importlib.import_module("drafting.medusa")
    heads = medusa.load_heads(_file_option(opts, "heads", "medusa"), env.target)
    strategy, cost = _build_feature_strategy("medusa", medusa.Medusa(), opts,
                                             {"draft": {"heads": heads.config.num_heads}})
    return JaxMethod("medusa", "medusa", opts, env, strategy, draft_model=heads, cost=cost)


def _build_eagle(env, opts):
    eagle = importlib.import_module("drafting.eagle")
    head = eagle.load_head(_file_option(opts, "head", "eagle"), env.target)
    strategy, cost = _build_feature_strategy("eagle", eagle.Eagle(), opts, {"draft": "eagle-head"})
    return JaxMethod("eagle", "eagle", opts, env, strategy, draft_model=head, cost=cost)


def _hf(mode):
    def build(env, opts):
        from . import hf_peers

        return hf_peers.HFMethod(env, mode, opts)
    return build


def _check_torch():
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise MethodUnavailable("the transformers peers (hf_*) need PyTorch, which is not installed here.")


# The switches every core method takes (unset: the library's default), see the module docstring.
SWITCHES = {"graphs": "", "attention": "", "projections": ""}

for _spec in (
    MethodSpec("ar", "autoregressive decoding (the baseline)", _build_ar, dict(SWITCHES)),
    MethodSpec("spec", "speculative decoding with the --draft model (confidence > 0: a row stops drafting "
                       "once the draft's top-1 probability falls below it)", _build_spec,
               {"gamma": 4, "confidence": 0.0, **SWITCHES},
               needs("decoding.Speculative", "drafting.DraftModel", method="spec"), uses_draft_model=True),
    MethodSpec("tree", "tree decoding (dynamic tree) with the --draft model", _build_tree,
               {"depth": 6, "top_k": 10, "nodes": 60, **SWITCHES},
               needs("decoding.TreeDecoding", "drafting.DraftModel", "drafting.DynamicTree", method="tree"),
               uses_draft_model=True),
    MethodSpec("pld", "prompt lookup decoding (n-gram drafts from the prompt)", _build_pld,
               {"gamma": 10, "ngram": 3, **SWITCHES},
               needs("decoding.Speculative", "drafting.PromptLookup", method="pld")),
    MethodSpec("layerskip", "layer-skip self-speculation (0 layers = half the target's)", _build_layerskip,
               {"gamma": 4, "layers": 0, **SWITCHES},
               needs("decoding.Speculative", "drafting.LayerSkip", method="layerskip")),
    MethodSpec("ht", "hidden transfer: the target drafts from pseudo states of its own verify forward "
                     "(maps=PATH from drafting.hidden_transfer.save_maps; tree=4-2-2 static tree, depth > 0 a dynamic "
                     "tree, else a chain of gamma; pseudo=separate: the accepted node's pseudo positions in a partial forward)", _build_ht,
               {"maps": "", "tree": "", "gamma": 3, "depth": 0, "top_k": 8, "nodes": 32, "pseudo": "verify",
                 **SWITCHES},
               needs("decoding.TreeDecoding", "drafting.hidden_transfer.HiddenTransfer", method="ht")),
    MethodSpec("medusa", "Medusa heads (heads=PATH from drafting.medusa.save_heads; tree=4-2-2 static tree, "
                         "depth > 0 a dynamic tree, else a chain of gamma)", _build_medusa,
               {"heads": "", "tree": "", "gamma": 3, "depth": 0, "top_k": 8, "nodes": 32, **SWITCHES},
               needs("decoding.TreeDecoding", "drafting.Medusa", method="medusa")),
    MethodSpec("eagle", "EAGLE-3-style head (head=PATH from drafting.eagle.save_head): a dynamic tree "
                        "(depth, top_k, nodes), depth=0 a chain of gamma, tree=4-2-2 a static tree",
               _build_eagle, {"head": "", "tree": "", "gamma": 4, "depth": 6, "top_k": 10, "nodes": 60, **SWITCHES},
               needs("decoding.TreeDecoding", "drafting.Eagle", method="eagle")),
    MethodSpec("hf_ar", "transformers generate(), eager, autoregressive", _hf("ar"), {}, _check_torch,
               uses_torch=True),
    MethodSpec("hf_assisted", "transformers assisted generation (assistant_model = the --draft model)",
               _hf("assisted"), {"tokens": 0}, _check_torch, uses_draft_model=True, uses_torch=True),
    MethodSpec("hf_static", "transformers generate() with a static cache + torch.compile", _hf("static"), {},
               _check_torch, uses_torch=True),
):
    register(_spec)

DEFAULT_METHODS = ("ar", "spec", "tree", "pld", "layerskip")
PEER_METHODS = ("hf_ar", "hf_assisted", "hf_static")


def default_methods() -> list[str]:
    """The headline set: every core method, plus the transformers peers when torch is present."""
    import importlib.util

    peers = list(PEER_METHODS) if importlib.util.find_spec("torch") is not None else []
    return list(DEFAULT_METHODS) + peers
