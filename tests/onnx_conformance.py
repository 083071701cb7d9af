"""Run ONNX's own operator test cases (onnx.backend.test node cases) through edgetrain's forward.

Used by tests/test_onnx_conformance.py and runnable by hand: `python tests/onnx_conformance.py`
prints every case with its verdict.
"""
from __future__ import annotations

import warnings

import numpy as np

import edgetrain
from edgetrain.ops import SUPPORTED

# Cases whose ops we support but which we leave out, with the reason (shown in the test report).
EXCLUDED = {
    "test_training_dropout": "random mask: ONNX's expected values come from numpy's global RNG, not a seeded stream",
    "test_training_dropout_mask": "random mask, as above",
    "test_training_dropout_default": "random mask, as above",
    "test_training_dropout_default_mask": "random mask, as above",
    "test_dropout_random_old": "opset 7 model, older than the opset 11 edgetrain imports",
    "test_dropout_default_old": "opset 7 model, older than the opset 11 edgetrain imports",
}

# Element types edgetrain computes in; cases on other types (bfloat16, float8, strings) are out of scope.
NUMERIC = {np.dtype(t) for t in (np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64,
                                 np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)}


def collect() -> list:
    """Node test cases whose every op edgetrain supports."""
    from onnx.backend.test.case import node

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)
    return [c for c in cases if c.model is not None and c.model.graph.node
            and all(n.op_type in SUPPORTED and n.domain in ("", "ai.onnx") for n in c.model.graph.node)]


def run_case(case) -> tuple[str, str]:
    """Return (verdict, detail): 'pass', 'fail', or 'skip' with the reason."""
    if case.name in EXCLUDED:
        return "skip", EXCLUDED[case.name]
    for inputs, outputs in case.data_sets:
        # Scalars arrive as numpy scalars; sequences and optionals as lists or None.
        inputs = [np.asarray(a) if isinstance(a, np.generic) else a for a in inputs]
        outputs = [np.asarray(a) if isinstance(a, np.generic) else a for a in outputs]
        arrays = list(inputs) + list(outputs)
        if any(not isinstance(a, np.ndarray) or a.dtype not in NUMERIC for a in arrays):
            return "skip", "element type outside edgetrain's numeric types"
        names = [i.name for i in case.model.graph.input][: len(inputs)]
        try:
            feeds = dict(zip(names, inputs))
            # Keep each input's own float type: the case fixes it, not our training dtype (constants too, so
            # a float16 graph's folded scale stays float16).
            floats = [a.dtype for a in inputs if np.issubdtype(a.dtype, np.floating)]
            model = edgetrain.load(case.model, dtype=floats[0] if floats else np.float32)
            with np.errstate(all="ignore"):
                got = model.run(feeds)
        except edgetrain.EdgetrainError as exc:
            if "older than" in str(exc):
                return "skip", str(exc).split(": ", 1)[-1]
            return "fail", f"refused: {exc}"
        except Exception as exc:  # a crash is a failure, with its message
            return "fail", f"{type(exc).__name__}: {exc}"
        for out_info, want in zip(case.model.graph.output, outputs):
            have = np.asarray(got[out_info.name])
            if have.shape != want.shape:
                return "fail", f"output '{out_info.name}' shape {have.shape} != {want.shape}"
            if have.dtype != want.dtype and not (np.issubdtype(have.dtype, np.floating)
                                                 and np.issubdtype(want.dtype, np.floating)):
                return "fail", f"output '{out_info.name}' dtype {have.dtype} != {want.dtype}"
            rtol = (max(case.rtol, 1e-4) if have.dtype == np.float16 or want.dtype == np.float16
                    else max(case.rtol, 1e-5))
            atol = max(case.atol, 1e-6)
            if not np.allclose(have.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True):
                err = np.abs(have.astype(np.float64) - want.astype(np.float64)).max()
                return "fail", f"output '{out_info.name}' differs (max abs error {err:.3g})"
    return "pass", ""


if __name__ == "__main__":
    counts: dict[str, int] = {}
    for c in collect():
        verdict, detail = run_case(c)
        counts[verdict] = counts.get(verdict, 0) + 1
        print(f"{verdict:5} {c.name} {detail}")
    print(counts)
