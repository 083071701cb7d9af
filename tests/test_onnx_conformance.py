"""ONNX's operator test cases for every supported op, through edgetrain's forward path."""
from collections import Counter

import onnx_conformance as oc
import pytest

CASES = oc.collect()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_onnx_node_case(case):
    verdict, detail = oc.run_case(case)
    if verdict == "skip":
        pytest.skip(detail)
    assert verdict == "pass", detail


def test_every_required_op_has_passing_cases():
    required = {"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Relu", "LeakyRelu", "Clip", "Sigmoid",
                "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape",
                "Transpose", "Concat", "Identity", "Dropout", "Softmax", "Constant"}
    passed = Counter()
    for c in CASES:
        if oc.run_case(c)[0] == "pass":
            for op in {n.op_type for n in c.model.graph.node}:
                passed[op] += 1
    missing = sorted(required - set(passed))
    assert not missing, f"no passing ONNX case for {missing}"
