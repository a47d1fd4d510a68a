"""float32 exp, log and log1p that LLVM can vectorise: arithmetic and bit moves, no libm call.

numba's math.exp and math.log on float32 are scalar calls to the C library (llvmlite ships without
Intel's SVML), about 3x slower per element than a vectorised loop; these are.  Special values
(NaN, +-inf, 0, negative, subnormal) are handled by selects, not branches, so loops over them stay
vectorised.  Accuracy against float64 (tests/test_cpu_kernels.py): exp and log within 2 ulp,
log1p within 3.

They are inlined into the kernels (inline="always"), so a kernel's fast-math flags apply to
them: kernels use 'contract' only (fused multiply-adds: the range reduction x - q ln2_hi stays
exact, as q ln2_hi is exact in float32, and the accuracy tests compile these with the kernels'
flags); never 'reassoc', which breaks the range reduction, nor 'nnan'/'ninf', which break NaN and
inf (the float64 sum in kernels.py alone reassociates).
"""

import numpy as np
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def f32_as_i32(typingctx, x):
    if x != types.float32:
        return None
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.int32))
    return types.int32(types.float32), codegen


@intrinsic
def i32_as_f32(typingctx, x):
    """The float32 whose bits are the low 32 bits of integer x (numba widens int32 arithmetic to int64)."""
    if not isinstance(x, types.Integer):
        return None
    def codegen(context, builder, sig, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, context.get_value_type(types.int32))
        return builder.bitcast(v, context.get_value_type(types.float32))
    return types.float32(x), codegen


F = np.float32
I = np.int32
LOG2E = F(1.44269504088896341)
L2U = F(0.693145751953125)          # ln2 split (Sleef): exact high part
L2L = F(1.428606765330187045e-06)
INF = F(np.inf)
NINF = F(-np.inf)
NAN = F(np.nan)
EXP_HI = F(88.72283935546875)       # above: inf
EXP_LO = F(-103.97208404541015625)  # below: 0


@njit(inline="always", error_model="numpy")
def exp32(x):
    """e**x for float32 x: x = q ln2 + s (ln2 in two parts, so s is exact), a degree-7 polynomial
    in s (the minimax coefficients of the SLEEF library's expf), times 2**q as two normal factors
    so that subnormal results keep their bits; 0 below -104, inf above 88.72, NaN stays NaN."""
    q = np.floor(x * LOG2E + F(0.5))
    qc = min(max(q, F(-150.0)), F(130.0))   # keeps the int conversion defined (NaN handled below)
    s = x - qc * L2U
    s = s - qc * L2L
    u = F(0.000198527617612853646278381)
    u = u * s + F(0.00139304355252534151077271)
    u = u * s + F(0.00833336077630519866943359)
    u = u * s + F(0.0416664853692054748535156)
    u = u * s + F(0.166666671633720397949219)
    u = u * s + F(0.5)
    u = (s * s) * u + (s + F(1.0))
    k = I(qc) if qc == qc else I(0)
    k1 = k >> 1                              # 2**k as two normal factors: subnormal results stay right
    k2 = k - k1
    r = u * i32_as_f32((k1 + I(127)) << I(23)) * i32_as_f32((k2 + I(127)) << I(23))
    r = F(0.0) if x < EXP_LO else r
    r = INF if x > EXP_HI else r
    return x if x != x else r


SQRTH = F(0.707106781186547524)


@njit(inline="always", error_model="numpy")
def log32(x):
    """log(x) for float32 x: x = m 2**e with m in [sqrt(1/2), sqrt(2)), log(1 + f) by the Cephes
    library's logf polynomial, plus e ln2 in two parts; log(0) = -inf, log(<0) = NaN, log(inf) = inf."""
    sub = x < F(1.17549435e-38)                 # subnormal (or <= 0): scale into the normal range
    xs = x * F(8388608.0) if sub else x
    bits = f32_as_i32(xs)
    e = ((bits >> I(23)) & I(0xFF)) - I(126)    # xs = m * 2**e with m in [0.5, 1)
    m = i32_as_f32((bits & I(0x007FFFFF)) | I(0x3F000000))
    e = e - I(23) if sub else e
    small = m < SQRTH
    e = e - I(1) if small else e
    f = (m + m - F(1.0)) if small else (m - F(1.0))
    z = f * f
    y = F(7.0376836292e-2)
    y = y * f - F(1.1514610310e-1)
    y = y * f + F(1.1676998740e-1)
    y = y * f - F(1.2420140846e-1)
    y = y * f + F(1.4249322787e-1)
    y = y * f - F(1.6668057665e-1)
    y = y * f + F(2.0000714765e-1)
    y = y * f - F(2.4999993993e-1)
    y = y * f + F(3.3333331174e-1)
    y = y * f * z
    fe = F(e)
    y = y + fe * F(-2.12194440e-4)
    y = y - F(0.5) * z
    r = f + y + fe * F(0.693359375)
    r = NINF if x == F(0.0) else r
    r = NAN if x < F(0.0) else r
    r = x if x == INF else r
    return x if x != x else r


@njit(inline="always", error_model="numpy")
def log1p32(y):
    """log(1 + y) for float32 y > -1, accurate for small y: with u = 1 + y rounded,
    log(u) * y / (u - 1) corrects the rounding of u (Goldberg's trick)."""
    u = y + F(1.0)
    d = u - F(1.0)
    r = log32(u) * (y / d) if d != F(0.0) else y
    r = u if u == INF else r
    return y if y != y else r


