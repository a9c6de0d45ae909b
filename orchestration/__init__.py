"""Plans of distillation stages: sequential and parallel paths, resumable, with a report.

The layer above `cacher/` and `trainer/`: it may import both (and `shared/`), and neither imports it.
Every stage runs as its own process (`kdcache build`, `kdtrain run`, `kdtrain eval`), so a stage can
run on another machine; this package only plans, validates, runs and reports them.

- plan.py: plan files: bounded loading, parsing and key checks (`Plan`, `PlanError`).
- stages.py: the plan as an ordered list of stages, each with its settings and its command.
- caches.py: what the cache stages left: markers, recorded caches, their manifests and keys.
- identity.py: a stage's settings as its command's dataclass takes them, their validation, and the
  stage's identity (its settings after defaults and its inputs' identities).
- state.py: where each stage stands (done, to run, to rerun and why, waiting for an earlier stage).
- checks.py: what is checked before any stage runs (files, tokenizers, the output folder).
- plan_folder.py: which folders a plan may write into, and its owner.json marker.
- runner.py: running stages as processes, their markers, the dry run.
- report.py: report.json, report.md and the plots, from what the stages left on disk: results.py (rows,
  comparisons, convergence), noise.py (the paired bootstrap over held-out sequences), report_md.py (report.md),
  plots.py (the PNGs).
- demo.py: the embedded default plan (`kdtrain demo`).
"""
