"""Grouped expert FFN kernels: per-expert BLAS GEMMs on contiguous row blocks, activation in a jitted loop.

Rows offsets[e]:offsets[e+1] of xs belong to expert e. The GEMMs are `np.dot(a[s:t], w[e], out[s:t])` on
C-contiguous slices (`buf[s:t]`, never `buf[s:t, :]`, which Numba types as non-contiguous and copies), which Numba
lowers to SciPy's BLAS (sgemm/dgemm) with no copy; transposed operands (`a[s:t].T`) are F-contiguous and go
through the BLAS transpose flags, also without a copy.

Work is cut into tiles (an expert's rows, or a slice of them when the expert is large) packed onto the threads
(`plan_tiles`); each thread runs its tiles one after another with single-threaded BLAS. Weight gradients of an
expert cut into several tiles are partial sums in scratch, added in a fixed order afterwards (`reduce_slots`).
Activation codes: 0 relu, 1 gelu (tanh form), 2 silu (see tinymoe/activations.py).
Elementwise math runs in the arrays' precision (float32 or float64); backward computes act(h) and act'(h) in one
pass from one exp per element.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._jit import njit

ACT_CODES = {"relu": 0, "gelu": 1, "silu": 2}  # the names tinymoe.activations.ACTIVATIONS accepts
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


# ---------------------------------------------------------------------------------------------------- activations
# Scalar twins of tinymoe.activations (the one definition of each): _sigmoid mirrors sigmoid, _gelu gelu, _gelu_grad
# gelu_grad, _silu silu, _silu_grad silu_grad, _relu relu, _relu_grad relu_grad; tests/test_numba_twins.py checks
# each against its reference on drawn values. They exist because LLVM vectorises only branch- and call-free scalar
# code. Scalar float64 forms, written without tanh:
#   gelu(v) = ½v(1 + tanh z) = v·σ(2z) with z = √(2/π)(v + 0.044715v³), since 1 + tanh z = 2σ(2z);
#   gelu'(v) = σ(2z) + 2√(2/π)·v·σ(2z)(1 − σ(2z))(1 + 3·0.044715v²), since 1 − tanh² z = 4σ(2z)(1 − σ(2z)).
# σ(u) is evaluated from e = exp(−|u|) (never overflows): q = 1/(1 + e), σ(u) = q or e·q, σ(u)(1 − σ(u)) = e·q².
# exp(−y) is `_exp_neg`, branch- and call-free so that LLVM vectorises the activation loops (libm's exp and tanh
# are scalar calls: tanh-form GELU ran 5× slower, libm exp 3×); its relative error is < 1e-15.
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # fdlibm's split of ln 2
_INV_LN2 = 1.0 / math.log(2.0)
_POW2_NEG = 2.0 ** -np.arange(1076.0)  # 2^-n, n = 0..1075 (the last ones subnormal or 0)
_C = tuple(1.0 / math.factorial(i) for i in range(13))  # Taylor coefficients of exp, degree 12


@njit(inline="always")
def _exp_neg(y):
    """exp(−y) for y ≥ 0: y = n·ln 2 − r with |r| ≤ ½ln 2 (Cody-Waite), exp(r) by Taylor to degree 12, × 2^−n."""
    y = y if y < 745.0 else 745.0  # exp(−745) is below the smallest subnormal: 0
    n = math.floor(y * _INV_LN2 + 0.5)
    r = (n * _LN2_HI - y) + n * _LN2_LO
    c = _C
    p = ((((((c[12] * r + c[11]) * r + c[10]) * r + c[9]) * r + c[8]) * r + c[7]) * r + c[6]) * r + c[5]  # Horner
    p = ((((p * r + c[4]) * r + c[3]) * r + c[2]) * r + c[1]) * r + c[0]
    return p * _POW2_NEG[int(n)]


@njit(inline="always")
def _sigmoid(u):
    e = _exp_neg(abs(u))
    q = 1.0 / (1.0 + e)
    s = q if u >= 0 else e * q
    return s if u == u else u  # NaN in, NaN out


@njit(inline="always")
def _gelu_arg(v):
    """2z = 2√(2/π)(v + 0.044715v³)"""
    return 2.0 * _GELU_C * (v + _GELU_A * v * v * v)


@njit(inline="always")
def _gelu(v):
    return v * _sigmoid(_gelu_arg(v))


@njit(inline="always")
def _relu(v):
    return 0.0 if v <= 0 else v  # NaN stays NaN, as np.maximum(NaN, 0) does in the reference


@njit(inline="always")
def _relu_grad(v):
    return 1.0 if v > 0 else 0.0


@njit(inline="always")
def _silu(v):
    return v * _sigmoid(v)


# ---- float32: the same forms in single precision, so that a vector register holds twice as many lanes.
# exp(−y) by Cody-Waite with ln 2 split into 0.693359375 (9 significant bits: n·hi is exact for n ≤ 150) and the
# rest, and Taylor to degree 7 on |r| ≤ ½ln 2 (truncation < 6e-9 relative, below float32's half-ulp 6e-8).
_F1, _F05 = np.float32(1.0), np.float32(0.5)
_LN2_HI32, _LN2_LO32 = np.float32(0.693359375), np.float32(-2.12194440e-4)
_INV_LN2_32 = np.float32(1.0 / math.log(2.0))
_POW2_NEG32 = (2.0 ** -np.arange(151.0)).astype(np.float32)  # 2^-n, n = 0..150 (subnormal from 127, 0 at 150)
_C32 = tuple(np.float32(1.0 / math.factorial(i)) for i in range(8))
_GELU_2C32, _GELU_A32 = np.float32(2.0 * _GELU_C), np.float32(_GELU_A)
_GELU_3A32 = np.float32(3.0 * _GELU_A)


@njit(inline="always")
def _exp_neg32(y):
    """exp(−y) for y ≥ 0 in float32 (relative error a few ulp; 0 from y ≈ 104, where float32 runs out)."""
    y = y if y < np.float32(104.0) else np.float32(104.0)
    n = np.int32(y * _INV_LN2_32 + _F05)  # round(y / ln 2): y ≥ 0, so truncation is floor
    nf = np.float32(n)
    r = (nf * _LN2_HI32 - y) + nf * _LN2_LO32
    c = _C32
    p = ((((((c[7] * r + c[6]) * r + c[5]) * r + c[4]) * r + c[3]) * r + c[2]) * r + c[1]) * r + c[0]
    return p * _POW2_NEG32[n]


@njit(inline="always")
def _sigmoid_parts32(u):
    """(σ(u), σ(u)(1 − σ(u))) in float32 from one exp: e = exp(−|u|), q = 1/(1 + e)."""
    e = _exp_neg32(abs(u))
    q = _F1 / (_F1 + e)
    return (q if u >= 0 else e * q), e * q * q


@njit(inline="always")
def _gelu32(v):
    s, _ = _sigmoid_parts32(_GELU_2C32 * (v + _GELU_A32 * v * v * v))
    return v * s


@njit(inline="always")
def _gelu_both32(v):
    """(gelu(v), gelu'(v)) in float32 from one exp."""
    s, slope = _sigmoid_parts32(_GELU_2C32 * (v + _GELU_A32 * v * v * v))
    return v * s, s + _GELU_2C32 * v * slope * (_F1 + _GELU_3A32 * v * v)


@njit(inline="always")
def _silu32(v):
    s, _ = _sigmoid_parts32(v)
    return v * s


@njit(inline="always")
def _silu_both32(v):
    s, slope = _sigmoid_parts32(v)
    return v * s, s + v * slope


@njit(inline="always")
def _gelu_both(v):
    """(gelu(v), gelu'(v)) in float64 from one exp: tinymoe.activations.gelu and gelu_grad."""
    u = _gelu_arg(v)
    e = _exp_neg(abs(u))
    q = 1.0 / (1.0 + e)
    s = q if u >= 0 else e * q
    s = s if u == u else u
    return v * s, s + 2.0 * _GELU_C * v * (e * q * q) * (1.0 + 3.0 * _GELU_A * v * v)


@njit(inline="always")
def _silu_both(v):
    """(silu(v), silu'(v)) in float64 from one exp: tinymoe.activations.silu and silu_grad."""
    e = _exp_neg(abs(v))
    q = 1.0 / (1.0 + e)
    s = q if v >= 0 else e * q
    s = s if v == v else v
    return v * s, s + v * (e * q * q)


# Row maps: one plain double loop over a 2-D row range per activation and precision, chosen outside the loops
# (`h.itemsize == 4` is float32). LLVM vectorised these; one loop branching on the activation code inside was not
# (6x slower), and passing the activation as a function argument made Numba refuse to cache the kernels. Hence
# the repetition. float32 arrays are computed in float32 (a few ulp, well inside the tests' 1e-5), float64 in
# float64.
@njit()
def _relu_rows(h, a, s, t):
    for i in range(s, t):
        for c in range(h.shape[1]):
            a[i, c] = _relu(h[i, c])


@njit()
def _relu_both_rows(h, a, d, s, t):
    for i in range(s, t):
        for c in range(h.shape[1]):
            v = h[i, c]
            a[i, c] = _relu(v)
            d[i, c] = _relu_grad(v)


@njit()
def _gelu_rows(h, a, s, t):
    if h.itemsize == 4:
        for i in range(s, t):
            for c in range(h.shape[1]):
                a[i, c] = _gelu32(h[i, c])
    else:
        for i in range(s, t):
            for c in range(h.shape[1]):
                a[i, c] = _gelu(np.float64(h[i, c]))


@njit()
def _gelu_both_rows(h, a, d, s, t):
    if h.itemsize == 4:
        for i in range(s, t):
            for c in range(h.shape[1]):
                a[i, c], d[i, c] = _gelu_both32(h[i, c])
    else:
        for i in range(s, t):
            for c in range(h.shape[1]):
                a[i, c], d[i, c] = _gelu_both(np.float64(h[i, c]))


@njit()
def _silu_rows(h, a, s, t):
    if h.itemsize == 4:
        for i in range(s, t):
            for c in range(h.shape[1]):
                a[i, c] = _silu32(h[i, c])
    else:
        for i in range(s, t):
            for c in range(h.shape[1]):
                a[i, c] = _silu(np.float64(h[i, c]))


@njit()
def _silu_both_rows(h, a, d, s, t):
    if h.itemsize == 4:
        for i in range(s, t):
            for c in range(h.shape[1]):
                a[i, c], d[i, c] = _silu_both32(h[i, c])
    else:
        for i in range(s, t):
            for c in range(h.shape[1]):
                a[i, c], d[i, c] = _silu_both(np.float64(h[i, c]))


@njit()
def act_rows(h, a, s, t, code):
    """a[s:t] = act(h[s:t]) for activation `code` (ACT_CODES), in h's precision."""
    if code == 0:
        _relu_rows(h, a, s, t)
    elif code == 1:
        _gelu_rows(h, a, s, t)
    else:
        _silu_rows(h, a, s, t)


@njit()
def act_both_rows(h, a, d, s, t, code):
    """a[s:t] = act(h[s:t]) and d[s:t] = act'(h[s:t]) in one pass (one exp per element for gelu and silu)."""
    if code == 0:
        _relu_both_rows(h, a, d, s, t)
    elif code == 1:
        _gelu_both_rows(h, a, d, s, t)
    else:
        _silu_both_rows(h, a, d, s, t)


@njit()
def mul_rows(g, d, s, t):
    """g[s:t] *= d[s:t], in place."""
    for i in range(s, t):
        for c in range(g.shape[1]):
            g[i, c] *= d[i, c]


@njit()
def add_rows(x, bias, s, t):
    """x[s:t] += bias (in x's dtype, as the reference adds its biases), in place."""
    for i in range(s, t):
        for c in range(x.shape[1]):
            x[i, c] += bias[c]


@njit()
def column_sums(rows, out):
    """out[c] = Σ_i rows[i, c], accumulated in float64 in row order (deterministic). rows (n, m) -> out (m,)"""
    acc = np.zeros(rows.shape[1], dtype=np.float64)
    for i in range(rows.shape[0]):
        for c in range(rows.shape[1]):
            acc[c] += rows[i, c]
    for c in range(rows.shape[1]):
        out[c] = acc[c]


# ---------------------------------------------------------------------------------------------------- scheduling
@njit()
def plan_tiles(offsets, num_bins, tile_rows):
    """Cut each expert's rows into tiles of at most `tile_rows` and pack the tiles onto `num_bins` threads.

    Returns
      tiles (n, 4) int64: expert, first row, end row, scratch slot (-1 for an expert's first tile, which writes
                          its weight gradients in place; later tiles write partial sums to scratch slot 0, 1, ...);
      bins (num_bins, n) int64: tile ids per thread, -1 padded (longest tile first onto the least-loaded thread);
      slot_start (E + 1,) int64: expert e's scratch slots are slot_start[e]:slot_start[e + 1], in row order.
    Deterministic: ties in size keep tile order, ties in load pick the lowest bin.
    """
    E = offsets.shape[0] - 1
    n = 0
    for e in range(E):
        rows = offsets[e + 1] - offsets[e]
        n += (rows + tile_rows - 1) // tile_rows
    tiles = np.empty((n, 4), dtype=np.int64)
    slot_start = np.zeros(E + 1, dtype=np.int64)
    i = 0
    for e in range(E):
        slot_start[e + 1] = slot_start[e]
        for s in range(offsets[e], offsets[e + 1], tile_rows):
            first = s == offsets[e]
            tiles[i, 0], tiles[i, 1], tiles[i, 2] = e, s, min(s + tile_rows, offsets[e + 1])
            tiles[i, 3] = -1 if first else slot_start[e + 1]
            if not first:
                slot_start[e + 1] += 1
            i += 1
    by_size = np.argsort(tiles[:, 1] - tiles[:, 2], kind="mergesort")  # longest first, stable
    bins = np.full((num_bins, n), -1, dtype=np.int64)
    fill = np.zeros(num_bins, dtype=np.int64)
    load = np.zeros(num_bins, dtype=np.int64)
    for q in by_size:
        b = np.argmin(load)
        bins[b, fill[b]] = q
        fill[b] += 1
        load[b] += tiles[q, 2] - tiles[q, 1]
    return tiles, bins, slot_start


# ---------------------------------------------------------------------------------------------------- forward
@njit()
def _tile_forward(xs, w1, b1, w2, b2, code, e, s, t, h, a, out):
    """Expert e on rows s:t, single-threaded: h = xs·W1 + b1, a = act(h), out = a·W2 + b2."""
    np.dot(xs[s:t], w1[e], h[s:t])
    add_rows(h, b1[e], s, t)
    act_rows(h, a, s, t, code)
    np.dot(a[s:t], w2[e], out[s:t])
    add_rows(out, b2[e], s, t)


@njit(parallel=True)
def ffn_forward(xs, w1, b1, w2, b2, code, tiles, bins, h, a, out):
    """Thread b runs the tiles bins[b, :] in turn (BLAS pinned to one thread by the caller).

    xs (R, d), w1 (E, d, f), b1 (E, f), w2 (E, f, d_out), b2 (E, d_out); fills h, a (R, f) and out (R, d_out).
    """
    for b in prange(bins.shape[0]):
        for q in bins[b]:
            if q < 0:
                break
            _tile_forward(xs, w1, b1, w2, b2, code, tiles[q, 0], tiles[q, 1], tiles[q, 2], h, a, out)


# ---------------------------------------------------------------------------------------------------- backward
@njit()
def _tile_backward(dout, xs, h, w1, w2, code, e, s, t, g, d, dxs, dw1, db1, dw2, db2):
    """Adjoint of expert e on rows s:t, single-threaded, into dxs[s:t] and the (E-less) weight grads given.

    g (R, f) is scratch: first act(h), then dh. dw1 (d, f), db1 (f,), dw2 (f, d_out), db2 (d_out,).
    """
    act_both_rows(h, g, d, s, t, code)  # a = act(h) into g[s:t] and d = act'(h), from the saved pre-activation
    np.dot(g[s:t].T, dout[s:t], dw2)  # dW2 = aᵀ·dout
    column_sums(dout[s:t], db2)
    np.dot(dout[s:t], w2[e].T, g[s:t])  # g <- dout·W2ᵀ (a is no longer needed)
    mul_rows(g, d, s, t)  # dh = (dout·W2ᵀ) ⊙ act'(h)
    np.dot(xs[s:t].T, g[s:t], dw1)  # dW1 = xsᵀ·dh
    column_sums(g[s:t], db1)
    np.dot(g[s:t], w1[e].T, dxs[s:t])  # dxs = dh·W1ᵀ


@njit(parallel=True)
def ffn_backward(dout, xs, h, w1, w2, code, tiles, bins, g, d, dxs, dw1, db1, dw2, db2, sw1, sb1, sw2, sb2):
    """Tiles in parallel as in ffn_forward. An expert's first tile writes its weight gradients in place, later
    tiles into scratch slots sw1/sb1/sw2/sb2[slot] (reduce_slots adds them). Experts without rows stay 0."""
    for b in prange(bins.shape[0]):
        for q in bins[b]:
            if q < 0:
                break
            e, s, t, slot = tiles[q, 0], tiles[q, 1], tiles[q, 2], tiles[q, 3]
            if slot < 0:
                _tile_backward(dout, xs, h, w1, w2, code, e, s, t, g, d, dxs, dw1[e], db1[e], dw2[e], db2[e])
            else:
                _tile_backward(dout, xs, h, w1, w2, code, e, s, t, g, d, dxs, sw1[slot], sb1[slot], sw2[slot],
                               sb2[slot])


@njit(parallel=True)
def reduce_slots(slot_start, dw1, db1, dw2, db2, sw1, sb1, sw2, sb2):
    """dW[e] += Σ its scratch slots, in row order (deterministic); parallel over the rows of dW1 and dW2."""
    E, d, f = dw1.shape
    for i in prange(d):
        for e in range(E):
            for slot in range(slot_start[e], slot_start[e + 1]):
                for c in range(f):
                    dw1[e, i, c] += sw1[slot, i, c]
    for i in prange(f):
        for e in range(E):
            for slot in range(slot_start[e], slot_start[e + 1]):
                for c in range(dw2.shape[2]):
                    dw2[e, i, c] += sw2[slot, i, c]
                db1[e, i] += sb1[slot, i]
    for e in range(E):
        for slot in range(slot_start[e], slot_start[e + 1]):
            for c in range(db2.shape[1]):
                db2[e, c] += sb2[slot, c]
