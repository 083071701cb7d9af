"""The error function in numpy, without scipy: fdlibm's erf (Sun Microsystems, 1993), vectorised.

fdlibm's rational approximations are good to < 1 ulp in float64 over the whole line. float32 inputs are
evaluated in float64 and rounded once, so their result is the correctly rounded value but for rare
double-rounding ties. Portable: its exp is `detfloat.exp` (IEEE operations only), so every CPU gives the same
bits; numpy's exp is per-platform SIMD code.

Coefficients from FreeBSD msun s_erf.c: "Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
Developed at SunSoft, a Sun Microsystems, Inc. business. Permission to use, copy, modify, and distribute this
software is freely granted, provided that this notice is preserved."
"""
from __future__ import annotations

import numpy as np

from edgetrain.kernels import detfloat

_ERX = 8.45062911510467529297e-01
_EFX = 1.28379167095512586316e-01  # 2/sqrt(pi) - 1
# erf(x) = x + x * P(x^2) / Q(x^2) on |x| < 0.84375
_PP = (1.28379167095512558561e-01, -3.25042107247001499370e-01, -2.84817495755985104766e-02,
       -5.77027029648944159157e-03, -2.37630166566501626084e-05)
_QQ = (1.0, 3.97917223959155352819e-01, 6.50222499887672944485e-02, 5.08130628187576562776e-03,
       1.32494738004321644526e-04, -3.96022827877536812320e-06)
# erf(x) = erx + P(s) / Q(s), s = |x| - 1, on 0.84375 <= |x| < 1.25
_PA = (-2.36211856075265944077e-03, 4.14856118683748331666e-01, -3.72207876035701323847e-01,
       3.18346619901161753674e-01, -1.10894694282396677476e-01, 3.54783043256182359371e-02,
       -2.16637559486879084300e-03)
_QA = (1.0, 1.06420880400844228286e-01, 5.40397917702171048937e-01, 7.18286544141962662868e-02,
       1.26171219808761642112e-01, 1.36370839120290507362e-02, 1.19844998467991074170e-02)
# erfc(x) = exp(-x^2 - 0.5625 + R(s) / S(s)) / x, s = 1/x^2, on 1.25 <= |x| < 1/0.35
_RA = (-9.86494403484714822705e-03, -6.93858572707181764372e-01, -1.05586262253232909814e+01,
       -6.23753324503260060396e+01, -1.62396669462573470355e+02, -1.84605092906711035994e+02,
       -8.12874355063065934246e+01, -9.81432934416914548592e+00)
_SA = (1.0, 1.96512716674392571292e+01, 1.37657754143519042600e+02, 4.34565877475229228821e+02,
       6.45387271733267880336e+02, 4.29008140027567833386e+02, 1.08635005541779435134e+02,
       6.57024977031928170135e+00, -6.04244152148580987438e-02)
# ... and on 1/0.35 <= |x| < 6 (beyond, erf is 1 to double precision)
_RB = (-9.86494292470009928597e-03, -7.99283237680523006574e-01, -1.77579549177547519889e+01,
       -1.60636384855821916062e+02, -6.37566443368389627722e+02, -1.02509513161107724954e+03,
       -4.83519191608651397019e+02)
_SB = (1.0, 3.03380607434824582924e+01, 3.25792512996573918826e+02, 1.53672958608443695994e+03,
       3.19985821950859553908e+03, 2.55305040643316442583e+03, 4.74528541206955367215e+02,
       -2.24409524465858183362e+01)


def _poly(coeffs: tuple[float, ...], z: np.ndarray) -> np.ndarray:
    """Horner's rule, lowest coefficient first (fdlibm's evaluation order, which its error bound assumes)."""
    acc = np.full_like(z, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc = acc * z + c
    return acc


def _erf64(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    out = np.empty_like(x)
    with np.errstate(all="ignore"):
        small = a < 0.84375
        t = x[small]
        z = t * t
        # Below 2**-28, x + x*efx is exact to rounding and the rational part would only add noise.
        out[small] = np.where(np.abs(t) < 2.0 ** -28, t + _EFX * t, t + t * (_poly(_PP, z) / _poly(_QQ, z)))

        mid = (a >= 0.84375) & (a < 1.25)
        s = a[mid] - 1.0
        out[mid] = np.copysign(_ERX + _poly(_PA, s) / _poly(_QA, s), x[mid])

        tail = (a >= 1.25) & (a < 6.0)
        t = a[tail]
        s = 1.0 / (t * t)
        near = t < 1 / 0.35
        ratio = np.where(near, _poly(_RA, s) / _poly(_SA, s), _poly(_RB, s) / _poly(_SB, s))
        # z is t with its low 32 bits cleared, so z*z is exact and exp's argument loses nothing.
        zt = (t.view(np.uint64) & np.uint64(0xFFFFFFFF00000000)).view(np.float64)
        r = detfloat.exp(-zt * zt - 0.5625) * detfloat.exp((zt - t) * (zt + t) + ratio)
        out[tail] = np.copysign(1.0 - r / t, x[tail])

        far = a >= 6.0
        out[far] = np.copysign(1.0, x[far])
        nan = np.isnan(x)
        out[nan] = x[nan]
    return out


def erf(x: np.ndarray) -> np.ndarray:
    """erf elementwise, in x's float dtype (float16/32 through float64, rounded once); odd, monotone, |erf| <= 1."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"erf needs a float array, got {x.dtype}")
    wide = np.ascontiguousarray(x, dtype=np.float64)
    return _erf64(wide.reshape(-1)).reshape(x.shape).astype(x.dtype, copy=False)
