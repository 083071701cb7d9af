"""The models users bring (torchvision and timm architectures, LSTM and GRU classifiers), exported by
both of torch's exporters through `edgetrain.from_torch`: forward against PyTorch and onnxruntime,
gradients against autograd, and one static 8/8 integer step.

The architectures come from models/torch_zoo.py (written module for module as torchvision and timm write
them; torchvision's wheel cannot be installed beside the CPU build of torch), at small widths so the zoo
runs within the suite's budget.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gradcheck import relative_errors

import edgetrain
from edgetrain.train.optim import SGD

torch = pytest.importorskip("torch")
from torch_reference import float64_gradients_match, settle_batchnorm, torch_grads  # noqa: E402

from models.export_torch import torch_mobilenetv2, torch_resnet18  # noqa: E402
from models.torch_zoo import SMALL  # noqa: E402

FORWARD_TOL = 1e-4  # relative to the largest logit, float32
GRAD_TOL_64 = 1e-6  # relative, float64, against autograd
BATCH = 4
NUM_CLASSES = 10
STEPS_8_8 = 4

ZOO = {
    **SMALL,
    "resnet18": (lambda: torch_resnet18(NUM_CLASSES, width=8), (3, 32, 32)),
    # 64x64 so its last BatchNorms see 2x2 pixels, not one (as in test_model_crosscheck)
    "mobilenet_v2": (lambda: torch_mobilenetv2(NUM_CLASSES, width_mult=0.25), (3, 64, 64)),
}
# The dynamo exporter is slow (seconds per model): it runs on the models whose ops differ most between
# the two exporters (Gelu at opset 20, LayerNormalization, chunk as SplitToSequence, Expand, CastLike, LSTM).
DYNAMO = ["shufflenet_v2", "convnext", "vit", "lstm"]
CASES = [(name, "torchscript") for name in ZOO] + [(name, "dynamo") for name in DYNAMO]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{e}" for n, e in CASES])
def exported(request, tmp_path_factory):
    name, exporter = request.param
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    build, shape = ZOO[name]
    module = build()
    x = torch.randn(BATCH, *shape)
    settle_batchnorm(module, x)
    path = str(tmp_path_factory.mktemp("zoo") / f"{name}-{exporter}.onnx")
    edgetrain.from_torch(module, x, path, exporter=exporter)
    return name, module, path, shape


def test_forward_matches_torch_and_onnxruntime(exported):
    name, module, path, shape = exported
    model = edgetrain.load(path)
    x = np.random.default_rng(7).standard_normal((BATCH + 1,) + shape).astype(np.float32)  # not the export batch
    ours = model(x)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        tref = module.eval()(torch.from_numpy(x)).numpy()
    scale = np.abs(tref).max()
    assert scale > 1e-3, "logits too small for the comparison to mean anything"
    assert np.abs(ours - tref).max() / scale < FORWARD_TOL
    assert np.abs(ours - ref).max() / scale < FORWARD_TOL


def test_gradients_match_autograd(exported):
    """float64: every parameter within 1e-6 of autograd. float32: no further from the float64 truth than
    PyTorch's own float32 gradients are (twice theirs, or 1e-4, whichever is larger): deep and depthwise
    nets at random init are ill-conditioned, and float32 cannot do better than torch does there."""
    name, module, path, shape = exported
    x = np.random.default_rng(8).standard_normal((BATCH,) + shape)
    labels = np.arange(BATCH) % NUM_CLASSES
    t64_loss, t64, _ = torch_grads(module, x, labels, torch.float64)
    _, t32, _ = torch_grads(module, x, labels, torch.float32)

    model64 = edgetrain.load(path, dtype=np.float64)
    float64_gradients_match(name, model64, x, labels, t64_loss, t64, GRAD_TOL_64)

    _, g32 = edgetrain.load(path).loss_and_grad(x.astype(np.float32), labels)
    torch_own = max(relative_errors(t32, t64).values())
    ours = relative_errors(g32, t64)
    worst = max(ours, key=ours.get)
    assert ours[worst] <= max(2 * torch_own, 1e-4), \
        f"{name} float32: {worst} {ours[worst]:.2e} from the float64 truth, torch's own {torch_own:.2e}"


def test_static_8_8_steps_train(exported):
    """Integer steps on one batch: finite, on the integer kernels, every parameter with a gradient updated,
    and the loss on that batch going down (a single step's gradient carries 8-bit rounding noise, so its
    direction alone says little at random init; descent over a few steps does)."""
    name, module, path, shape = exported
    x = np.random.default_rng(9).standard_normal((BATCH,) + shape).astype(np.float32)
    labels = np.arange(BATCH) % NUM_CLASSES
    model = edgetrain.load(path)
    model.set_precision("8/8")
    before = {k: v.copy() for k, v in model.parameters().items()}
    optimizer = SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses, moving = [], set()
    for _ in range(STEPS_8_8):
        loss, grads = model.loss_and_grad(x, labels)
        assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())
        losses.append(loss)
        moving |= {k for k, g in grads.items() if np.any(g)}
        optimizer.step(grads)
    assert len(moving) > len(before) // 2
    frozen = sorted(k for k in moving if np.array_equal(model.parameters()[k], before[k]))
    assert not frozen, f"{name}: {frozen} did not train"
    assert model.cost.percent_of_fp32 < 100.0, f"{name}: no layer ran on the integer kernels"
    assert losses[-1] < losses[0], f"{name}: 8/8 losses {np.round(losses, 4).tolist()} do not go down"


def test_onnx_files_are_what_the_exporters_wrote(exported):
    """Sanity of the fixture itself: BatchNorm survives wherever the module has one."""
    name, module, path, _ = exported
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ("BatchNormalization" in ops) == has_bn
