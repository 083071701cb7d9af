"""Developer tools (benchmarks, experiments, asset regeneration), run from the repository root.

    python -m tools.bench | tools.bench_step | tools.bench_kernels | tools.fractrain_experiment |
              tools.ablate_pfq | tools.make_demo_model | tools.make_digits

Not installed with edgetrain: they import the installed (or checked-out) `edgetrain` and `models` from the
working directory, without editing sys.path.
"""
