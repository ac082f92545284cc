"""experiments package: the benchmark harness and one script per paper experiment.

- `specbench`: the Spec-Bench runner (`python -m experiments.specbench`), resumable, with the
  leaderboard report; `questions` (data and subsets), `methods` (the method registry),
  `hf_peers` (transformers as a peer), `store` (the crash-safe results file), `summary`
  (leaderboard math, Markdown, plots), `toy` (a random model for trying the machinery).
- `roofline`: prints a model's roofline cost on a device (`python -m experiments.roofline`); the
  cost model itself is `decoding.roofline`.
- `autotune`: tunes a benchmark method's gamma or tree shape on prompts kept apart from the
  report's (`python -m experiments.autotune`); the tuner itself is `decoding.autotune`.
Results live in `experiments/results/`; see docs/benchmarks.md.
"""
