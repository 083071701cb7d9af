"""The tiles' operand coding per instruction set (`vnni.lane_coding`): every 8-bit value of either signedness,
coded into the lanes' type, is its code plus the zero point the kernels correct by, on every form.

The `sdot` form itself runs only on Arm: tools/arm64_board.sh checks it end to end on an emulated Cortex-A76
(ResNet-8's weight digest against this host's), and its exactness self-check runs wherever it is chosen."""
from __future__ import annotations

import numpy as np
import pytest

from edgetrain.kernels import vnni


@pytest.mark.parametrize("form", ["avx2", "sdot"])
@pytest.mark.parametrize("signed", [True, False])
def test_every_value_is_its_code_plus_the_zero_point(monkeypatch, form, signed):
    monkeypatch.setenv(vnni.ISA_ENV, form)  # only the coding is asked: nothing is compiled for that form
    assert vnni.isa() == form or (form == "avx2" and vnni.isa() == "")  # "" on a host without AVX2
    lanes = np.int8 if vnni.lanes_signed() else np.uint8
    assert vnni.lanes_signed() == (form == "sdot")
    xor, zp = vnni.lane_coding(signed)
    values = np.arange(-128, 128) if signed else np.arange(0, 256)
    raw = values.astype(np.int8 if signed else np.uint8).view(np.uint8)
    codes = (raw ^ np.uint8(xor)).view(lanes).astype(np.int64)
    assert np.array_equal(codes + zp, values)
    assert (xor == 0) == (zp == 0) == ((lanes == np.int8) == signed)


def test_a_forced_sdot_form_is_not_vnni(monkeypatch):
    monkeypatch.setenv(vnni.ISA_ENV, "sdot")
    assert vnni.has_sdot() and not vnni.has_vnni() and vnni.available() and vnni.isa() == "sdot"
