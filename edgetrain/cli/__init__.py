"""The command line: `edgetrain train|eval|export|info|plot|demo|profile` (main), the demo, plots, argument types."""
