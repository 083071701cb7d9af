"""Precision control: per-layer bit-width specs (spec), BitOPs (cost), static/PFQ/FracTrain controllers,
measured latency tables, and DFQ (dfq/)."""
