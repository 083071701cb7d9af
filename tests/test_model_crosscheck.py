"""Whole models: edgetrain's forward against onnxruntime, gradients against finite differences and
PyTorch autograd."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gradcheck import check_model_gradients, relative_error, relative_errors
from onnx import numpy_helper

import edgetrain
import models

FORWARD_TOL = 1e-4  # relative, float32, against onnxruntime
TORCH_GRAD_TOL = 1e-4  # relative, float32, against PyTorch autograd
FD_TOL = 1e-6  # relative, float64, against central differences

# Small inputs keep the suite fast; the graphs are the same as at full size.
SHIPPED = {
    "resnet8": dict(input_size=16),
    "resnet20": dict(input_size=8),
    "resnet38": dict(input_size=8),
    "resnet74": dict(input_size=8),
    "mobilenetv2": dict(input_size=16, width_mult=0.5),
    "mobilenetv3_small": dict(input_size=32, width_mult=0.5),
    "vit_tiny": dict(input_size=8, patch=4, dim=16, depth=2, heads=2),
    "lenet5": dict(),
    "mlp": dict(),
}


def randomise_state(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Give BatchNorm non-trivial statistics and affine terms, so a match means something."""
    rng = np.random.default_rng(seed)
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t)
        if t.name.endswith("running_var"):
            new = rng.uniform(0.5, 2.0, arr.shape)
        elif t.name.endswith("running_mean") or (t.name.endswith("bias") and arr.ndim == 1):
            new = rng.normal(0, 0.2, arr.shape)
        elif arr.ndim == 1 and "bn" in t.name or "downsample.1" in t.name:
            new = rng.uniform(0.5, 1.5, arr.shape)
        else:
            continue
        t.CopyFrom(numpy_helper.from_array(new.astype(arr.dtype), t.name))
    return model


def input_for(model: edgetrain.Model, batch: int, seed: int = 0) -> np.ndarray:
    shape = (batch,) + tuple(model.input_shape[1:])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ort_run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_forward_matches_onnxruntime(name):
    proto = randomise_state(models.build_model(name, seed=1, **SHIPPED[name]), seed=2)
    model = edgetrain.load(proto)
    x = input_for(model, batch=3)
    ours, ref = model(x), ort_run(proto, x)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < FORWARD_TOL, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", ["lenet5", "mlp", "resnet8", "mobilenetv2", "vit_tiny"])
def test_shipped_model_gradients_match_finite_differences(name):
    kwargs = dict(SHIPPED[name])
    if name == "mobilenetv2":
        kwargs.update(input_size=16, width_mult=0.25)
    if name == "resnet8":
        kwargs.update(input_size=8)
    proto = randomise_state(models.build_model(name, seed=3, **kwargs), seed=4)
    model = edgetrain.load(proto)
    x = input_for(model, batch=3, seed=5)
    # MobileNetV2's 52 tensors at 6 coordinates each took 2 minutes of the suite; 3 each cover them all
    samples = 3 if name == "mobilenetv2" else 6
    errors = check_model_gradients(model, {model.input_name: x}, training=True, samples=samples)
    worst = max(errors, key=errors.get)
    assert errors[worst] < FD_TOL, f"{name}: {worst} relative error {errors[worst]:.2e}"


# --- models exported by PyTorch ---------------------------------------------------------------
torch = pytest.importorskip("torch")
from torch_reference import float64_gradients_match, settle_batchnorm, torch_grads  # noqa: E402

from edgetrain import from_torch  # noqa: E402
from models.export_torch import torch_mobilenetv2, torch_resnet18  # noqa: E402

# (builder, input batch shape): MobileNetV2 at 64x64 so its last BatchNorms see 2x2 pixels, not one.
TORCH_MODELS = {
    "resnet18": (lambda: torch_resnet18(num_classes=10, width=16), (4, 3, 32, 32)),
    "mobilenetv2": (lambda: torch_mobilenetv2(num_classes=10, width_mult=0.35), (4, 3, 64, 64)),
}


@pytest.fixture(scope="module", params=sorted(TORCH_MODELS))
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    build, shape = TORCH_MODELS[request.param]
    module = build()
    x = torch.randn(*shape)
    settle_batchnorm(module, x)
    path = str(tmp_path_factory.mktemp("torch") / f"{request.param}.onnx")
    from_torch(module, x, path)
    return request.param, module, path, shape


def test_torch_export_forward_matches_onnxruntime_and_torch(exported):
    name, module, path, shape = exported
    model = edgetrain.load(path)
    x = np.random.default_rng(7).standard_normal((5,) + shape[1:]).astype(np.float32)
    ours = model(x)
    ref = ort_run(onnx.load(path), x)
    with torch.no_grad():
        tref = module.eval()(torch.from_numpy(x)).numpy()
    scale = np.abs(ref).max()
    assert scale > 1e-3, "logits too small for the comparison to mean anything"
    assert np.abs(ours - ref).max() / scale < FORWARD_TOL
    assert np.abs(ours - tref).max() / scale < FORWARD_TOL


def test_torch_export_gradients_match_autograd(exported):
    """float64: every tensor within 1e-6 of autograd. float32: within 1e-4 of torch where float32 can
    resolve 1e-4 at all (torch's own float32 error below half that, as for ResNet-18); otherwise (a
    random-init MobileNetV2, whose BatchNorms see few values per channel) at most 2x as far from the
    float64 truth as torch's own float32 result is."""
    name, module, path, shape = exported
    x = np.random.default_rng(8).standard_normal(shape)
    labels = np.arange(shape[0]) % 10
    t64_loss, t64, t64_module = torch_grads(module, x, labels, torch.float64)
    t32_loss, t32, _ = torch_grads(module, x, labels, torch.float32)

    model64 = edgetrain.load(path, dtype=np.float64)
    float64_gradients_match(name, model64, x, labels, t64_loss, t64, FD_TOL)

    model32 = edgetrain.load(path)
    loss32, g32 = model32.loss_and_grad(x.astype(np.float32), labels)
    assert abs(loss32 - t32_loss) / abs(t32_loss) < TORCH_GRAD_TOL
    torch_own = max(relative_errors(t32, t64).values())
    if torch_own < TORCH_GRAD_TOL / 2:
        vs_torch = relative_errors(g32, t32)
        worst = max(vs_torch, key=vs_torch.get)
        assert vs_torch[worst] < TORCH_GRAD_TOL, f"{name} float32: {worst} relative error {vs_torch[worst]:.2e}"
    else:
        ours = max(relative_errors(g32, t64).values())
        assert ours <= 2 * torch_own, f"{name} float32: ours {ours:.2e} from truth, torch's own {torch_own:.2e}"

    # Running statistics after one training step agree with torch's too.
    tbuf = dict(t64_module.named_buffers())
    for k, v in model64.buffers().items():
        assert relative_error(v, tbuf[k].numpy()) < FD_TOL, k
