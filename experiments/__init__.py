"""experiments package: the benchmark harness and one script per paper experiment.

- `specbench`: the Spec-Bench runner (`python -m experiments.specbench`), resumable, with the
  leaderboard report; `questions` (data and subsets), `methods` (the method registry),
  `hf_peers` (transformers as a peer), `store` (the crash-safe results file), `summary`
  (leaderboard math, Markdown, plots), `toy` (a random model for trying the machinery).
- `roofline`: the roofline cost model and predicted speedups (`python -m experiments.roofline`).
- `autotune`: choosing gamma or a tree's shape from calibration + the cost model.
Results live in `experiments/results/`; see docs/benchmarks.md.
"""
