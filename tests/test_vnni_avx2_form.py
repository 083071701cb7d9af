"""The fused 8-bit tiles' AVX2 form (`vnni._TileCode`): its row split against NumPy, and on a host with AVX-512
VNNI, where the tiles would otherwise take their VNNI form, compiled in a child with a Numba cache of its own and
checked against NumPy int64."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_AVX2_FORM_CHILD = """
import numpy as np
from edgetrain.kernels import vnni
from edgetrain.kernels.vnni_backend import VnniBackend
from edgetrain.kernels.geometry import conv2d_geometry
assert vnni.isa() == "avx2", vnni.isa()
vb = VnniBackend()
assert vb.vnni_kernels_pass()
rng = np.random.default_rng(3)
for x_shape, m, stride in (((3, 16, 9, 9), 24, 1), ((2, 5, 11, 11), 40, 2), ((2, 64, 8, 8), 64, 1)):
    x = rng.integers(0, 256, x_shape, dtype=np.uint8)
    w = rng.integers(-128, 128, (m, x_shape[1], 3, 3), dtype=np.int8)
    geo = conv2d_geometry(x.shape, w.shape, stride, (1, 1, 1, 1))
    y = vb._forward(x, w, geo, None)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros(geo.y_shape, np.int64)
    dy = rng.integers(-128, 128, geo.y_shape, dtype=np.int8)
    want_w = np.zeros(w.shape, np.int64)
    for r in range(3):
        for s in range(3):
            win = xp[:, :, r:r + stride * geo.out_h:stride, s:s + stride * geo.out_w:stride]
            want += np.einsum("nchw,mc->nmhw", win, w[:, :, r, s].astype(np.int64))
            want_w[:, :, r, s] = np.einsum("nmhw,nchw->mc", dy.astype(np.int64), win)
    assert np.array_equal(y, want)
    assert np.array_equal(vb._wgrad(dy, x, geo, np.dtype(np.int64)), want_w)
print("avx2 form exact")
"""


def test_avx2_form_is_exact_on_a_vnni_host(tmp_path):
    """On a VNNI host the tiles' AVX2 form (`vnni.ISA_ENV`, compiled into a cache of its own in a child)
    gives the int64 reference's integers too, so one machine checks both forms; on an AVX2 host the other
    tests here run that form already."""
    from edgetrain.kernels import vnni
    if not vnni.has_vnni():
        pytest.skip("no AVX-512 VNNI here: tests/test_kernels.py checks the AVX2 form in its own process")
    env = {**os.environ, vnni.ISA_ENV: "avx2", "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _AVX2_FORM_CHILD], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0 and "avx2 form exact" in done.stdout, done.stderr[-2000:]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-128, 127), min_size=0, max_size=67))
def test_split_words_orders_each_group_0_2_1_3_as_int16(codes):
    """`vnni.split_words` against NumPy: every whole group of 4 int8 codes as int16 in the order 0, 2, 1, 3
    (the even and odd halves the AVX2 tiles multiply), trailing codes as they are, sign kept."""
    from edgetrain.kernels import vnni

    packed = np.array(codes, np.int8)
    whole = packed.size // 4 * 4
    want = np.concatenate([packed[:whole].reshape(-1, 4)[:, [0, 2, 1, 3]].reshape(-1), packed[whole:]])
    got = vnni.split_words(packed)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, want.astype(np.int16))
