"""Property tests (float64) for reparam.math.kernels against torch.nn.functional convolutions."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st

from reparam.math import kernels as K

DT = torch.float64


def close(got, ref, tol=1e-9):
    err = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-12)
    assert got.shape == ref.shape
    assert err <= tol * scale, f"relative error {err / scale:.3g}"


def differs(got, ref):
    return got.shape != ref.shape or (got - ref).abs().max().item() > 1e-6 * ref.abs().max().item()


def randn(gen, *shape):
    return torch.randn(shape, generator=gen, dtype=DT)


@st.composite
def rng(draw):
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


@st.composite
def channels_groups(draw, depthwise_ok=True):
    """(in, out, groups) with channels <= 8 and multiples of groups."""
    kind = draw(st.sampled_from(["1", "2", "dw"] if depthwise_ok else ["1", "2"]))
    if kind == "dw":
        c = draw(st.integers(1, 8))
        return c, c * draw(st.sampled_from([1, 1, 2])), c
    g = int(kind)
    return g * draw(st.integers(1, 8 // g)), g * draw(st.integers(1, 8 // g)), g


@st.composite
def geometry(draw, nd, max_k=None, strides=(1, 2), dilations=(1, 2, 3), max_pad=3):
    """Per-axis (k, stride, dilation, (lo, hi)) tuples for a conv with nd spatial axes."""
    max_k = max_k or (7 if nd < 3 else 3)
    k = tuple(draw(st.integers(1, max_k)) for _ in range(nd))
    s = tuple(draw(st.sampled_from(strides)) for _ in range(nd))
    d = tuple(draw(st.sampled_from(dilations)) if kk > 1 else 1 for kk in k)
    p = tuple((draw(st.integers(0, max_pad)), draw(st.integers(0, max_pad))) for _ in range(nd))
    return k, s, d, p


def input_size(draw, nd, k, d, p, lo=5, hi=12):
    """Spatial sizes giving at least one output position."""
    if nd == 3:
        lo, hi = 3, 6
    return tuple(max(draw(st.integers(lo, hi)), d[a] * (k[a] - 1) + 1 - p[a][0] - p[a][1], 1)
                 for a in range(nd))


ND = st.sampled_from([1, 2, 2, 3])


# ---------------------------------------------------------------------------------------------------
@given(gen=rng(), c=st.integers(1, 8), affine=st.booleans())
def test_bn_scale_shift(gen, c, affine):
    mean, var = randn(gen, c), randn(gen, c).abs() + 0.1
    w, b = (randn(gen, c), randn(gen, c)) if affine else (None, None)
    x = randn(gen, 3, c, 4)
    s, t = K.bn_scale_shift(mean, var, w, b, 1e-5)
    ref = F.batch_norm(x, mean, var, w, b, training=False, eps=1e-5)
    close(s[:, None] * x + t[:, None], ref)


@given(gen=rng(), nd=st.sampled_from([1, 2, 3]), cg=channels_groups(), data=st.data(), bias=st.booleans(),
       batch=st.integers(1, 2), chunk=st.sampled_from([None, 1, 64]))
def test_grouped_conv_equals_torch(gen, nd, cg, data, bias, batch, chunk):
    """The float64 grouped convs (windows times kernels with groups in chunks; tap by tap) are torch's conv."""
    cin, cout, g = cg
    k, st_, d, p = data.draw(geometry(nd))
    x = randn(gen, batch, cin, *input_size(data.draw, nd, k, d, p))
    W, b = randn(gen, cout, cin // g, *k), randn(gen, cout) if bias else None
    flat = [v for a in reversed(range(nd)) for v in p[a]]
    xp = F.pad(x, flat)
    ref = (F.conv1d, F.conv2d, F.conv3d)[nd - 1](xp, W, b, st_, 0, d, g)
    old = K.GROUPED_CONV_CHUNK
    K.GROUPED_CONV_CHUNK = chunk or old
    try:
        got = K.grouped_conv(xp, W, b, st_, d, g)
    finally:
        K.GROUPED_CONV_CHUNK = old
    close(got, ref, 1e-12)
    close(K.tapwise_conv(xp, W, b, st_, d, g), ref, 1e-12)
    close(K.conv_nd(x, W, b, st_, p, d, g), ref, 1e-12)


@given(gen=rng(), nd=st.sampled_from([0, 1, 2, 3]), cg=channels_groups(), data=st.data(),
       bias=st.booleans(), s_kind=st.sampled_from(["vec", "scalar"]),
       t_kind=st.sampled_from(["vec", "scalar", None]))
def test_fold_affine_after(gen, nd, cg, data, bias, s_kind, t_kind):
    cin, cout, g = cg
    k, st_, d, p = data.draw(geometry(nd))
    W, b = randn(gen, cout, cin // g, *k), randn(gen, cout) if bias else None
    s = randn(gen, cout) if s_kind == "vec" else randn(gen)
    t = {"vec": randn(gen, cout), "scalar": randn(gen), None: None}[t_kind]
    x = randn(gen, 2, cin, *input_size(data.draw, nd, k, d, p))
    y = K.conv_nd(x, W, b, st_, p, d, g)
    sh = (-1,) + (1,) * nd
    ref = y * (s.reshape(sh) if s.ndim else s) + (0 if t is None else t.reshape(sh) if t.ndim else t)
    W2, b2 = K.fold_affine_after(W, b, s, t)
    close(K.conv_nd(x, W2, b2, st_, p, d, g), ref)


@given(gen=rng(), nd=st.sampled_from([0, 1, 2, 3]), cg=channels_groups(), data=st.data(),
       bias=st.booleans(), s_kind=st.sampled_from(["vec", "scalar"]),
       t_kind=st.sampled_from(["vec", "scalar", None]))
def test_fold_affine_before(gen, nd, cg, data, bias, s_kind, t_kind):
    cin, cout, g = cg
    k, st_, d, p = data.draw(geometry(nd))
    if t_kind is not None:  # a shift before the conv is exact only without zero padding
        p = tuple((0, 0) for _ in range(nd))
    W, b = randn(gen, cout, cin // g, *k), randn(gen, cout) if bias else None
    s = randn(gen, cin) if s_kind == "vec" else randn(gen)
    t = {"vec": randn(gen, cin), "scalar": randn(gen), None: None}[t_kind]
    x = randn(gen, 2, cin, *input_size(data.draw, nd, k, d, p))
    sh = (-1,) + (1,) * nd
    xa = x * (s.reshape(sh) if s.ndim else s) + (0 if t is None else t.reshape(sh) if t.ndim else t)
    W2, b2 = K.fold_affine_before(W, b, g, s, t)
    close(K.conv_nd(x, W2, b2, st_, p, d, g), K.conv_nd(xa, W, b, st_, p, d, g))


def test_fold_affine_before_with_padding_and_shift_is_not_exact():
    gen = torch.Generator().manual_seed(0)
    W, s, t = randn(gen, 4, 4, 3, 3), randn(gen, 4), randn(gen, 4)
    x, p = randn(gen, 1, 4, 6, 6), ((1, 1), (1, 1))
    W2, b2 = K.fold_affine_before(W, None, 1, s, t)
    ref = K.conv_nd(x * s[:, None, None] + t[:, None, None], W, None, (1, 1), p, (1, 1), 1)
    got = K.conv_nd(x, W2, b2, (1, 1), p, (1, 1), 1)
    assert differs(got, ref)
    close(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])  # only the border is wrong


# ---------------------------------------------------------------------------------------------------
@given(gen=rng(), nd=ND, data=st.data(), bias=st.booleans())
def test_expand_groups(gen, nd, data, bias):
    g = data.draw(st.sampled_from([1, 2, 4, 8, 6]))
    new_g = data.draw(st.sampled_from([q for q in range(1, g + 1) if g % q == 0]))
    cin = g * data.draw(st.integers(1, max(1, 8 // g)))
    cout = g * data.draw(st.integers(1, max(1, 8 // g)))
    k, st_, d, p = data.draw(geometry(nd))
    W, b = randn(gen, cout, cin // g, *k), randn(gen, cout) if bias else None
    x = randn(gen, 2, cin, *input_size(data.draw, nd, k, d, p))
    W2 = K.expand_groups(W, g, new_g)
    assert W2.shape == (cout, cin // new_g, *k)
    close(K.conv_nd(x, W2, b, st_, p, d, new_g), K.conv_nd(x, W, b, st_, p, d, g))


@given(gen=rng(), nd=ND, cg=channels_groups(), data=st.data())
def test_redilate(gen, nd, cg, data):
    cin, cout, g = cg
    k, st_, _, p = data.draw(geometry(nd))
    new = tuple(data.draw(st.sampled_from([1, 2])) for _ in range(nd))
    d = tuple(n * data.draw(st.sampled_from([1, 2, 3])) for n in new)
    W = randn(gen, cout, cin // g, *k)
    x = randn(gen, 2, cin, *input_size(data.draw, nd, k, d, p))
    W2 = K.redilate(W, d, new)
    close(K.conv_nd(x, W2, None, st_, p, new, g), K.conv_nd(x, W, None, st_, p, d, g))


@given(gen=rng(), nd=ND, cg=channels_groups(), data=st.data(), n=st.integers(1, 4))
def test_pad_kernel_parallel_offsets(gen, nd, cg, data, n):
    """A sum of aligned branches (any kernel size, dilation, lo pad) equals one merged conv."""
    cin, cout, g = cg
    stride = tuple(data.draw(st.sampled_from([1, 2])) for _ in range(nd))
    geos = [data.draw(geometry(nd)) for _ in range(n)]
    effs = [tuple(d[a] * (k[a] - 1) + 1 for a in range(nd)) for k, _, d, _ in geos]
    # common slack lo+hi-(eff-1) per axis, at least -(smallest eff - 1) so no padding is negative
    slack = [data.draw(st.integers(1 - min(e[a] for e in effs), 2)) for a in range(nd)]
    branches = []
    for (k, _, d, _), e in zip(geos, effs):
        tot = [slack[a] + e[a] - 1 for a in range(nd)]
        lo = [data.draw(st.integers(0, tot[a])) for a in range(nd)]
        pad = tuple((lo[a], tot[a] - lo[a]) for a in range(nd))
        W, b = randn(gen, cout, cin // g, *k), randn(gen, cout) if data.draw(st.booleans()) else None
        branches.append((W, b, d, pad))
    lo, hi, ks, offs = K.parallel_offsets([(e, p) for e, (_, _, _, p) in zip(effs, branches)])
    size = tuple(max(data.draw(st.integers(3, 12 if nd < 3 else 6)), ks[a] - lo[a] - hi[a], 1)
                 for a in range(nd))
    x = randn(gen, 2, cin, *size)
    ref = sum(K.conv_nd(x, W, b, stride, p, d, g) for W, b, d, p in branches)
    Wm, bm = torch.zeros(cout, cin // g, *ks, dtype=DT), torch.zeros(cout, dtype=DT)
    for (W, b, d, _), e, off in zip(branches, effs, offs):
        dense = K.redilate(W, d, (1,) * nd)
        Wm = Wm + K.pad_kernel(dense, off, tuple(ks[a] - off[a] - e[a] for a in range(nd)))
        bm = bm if b is None else bm + b
    close(K.conv_nd(x, Wm, bm, stride, tuple(zip(lo, hi)), (1,) * nd, g), ref)


@given(gen=rng(), nd=ND, data=st.data(), n=st.integers(1, 4))
def test_sum_padded_equals_pad_then_add(gen, nd, data, n):
    """sum_padded(Σ cᵢ·Wᵢ at offsets) equals padding each kernel with F.pad, scaling and adding, in float64;
    its inputs are left as they were."""
    size = tuple(data.draw(st.integers(1, 5)) for _ in range(nd))
    terms, ref = [], torch.zeros(3, 2, *size, dtype=DT)
    for _ in range(n):
        k = tuple(data.draw(st.integers(1, s)) for s in size)
        off = tuple(data.draw(st.integers(0, s - kk)) for s, kk in zip(size, k))
        c = data.draw(st.sampled_from([1.0, -1.0, 0.5, 2.0, -0.25]))
        W = randn(gen, 3, 2, *k)
        terms.append((W, off, c))
        flat = [p for a in reversed(range(nd)) for p in (off[a], size[a] - off[a] - k[a])]
        ref = ref + c * F.pad(W, flat)
    before = [W.clone() for W, _, _ in terms]
    got = K.sum_padded(terms, size)
    assert got.dtype == DT and got.shape == ref.shape
    close(got, ref, tol=1e-15)
    assert all(torch.equal(W, b) for (W, _, _), b in zip(terms, before))
    assert all(got.data_ptr() != W.data_ptr() for W, _, _ in terms)


@given(gen=rng(), nd=ND, data=st.data())
def test_pad_kernel_equals_f_pad(gen, nd, data):
    """pad_kernel writes the kernel into its window of zeros: exactly F.pad, on a fresh tensor."""
    k = tuple(data.draw(st.integers(1, 4)) for _ in range(nd))
    lo = tuple(data.draw(st.integers(0, 2)) for _ in range(nd))
    hi = tuple(data.draw(st.integers(0, 2)) for _ in range(nd))
    W = randn(gen, 2, 3, *k)
    got = K.pad_kernel(W, lo, hi)
    assert torch.equal(got, F.pad(W, [p for a in reversed(range(nd)) for p in (lo[a], hi[a])]))
    assert got.data_ptr() != W.data_ptr()


def test_sum_padded_refuses_kernels_that_do_not_fit():
    W = torch.ones(1, 1, 3, 3, dtype=DT)
    with pytest.raises(ValueError, match="does not fit"):
        K.sum_padded([(W, (1, 0), 1.0)], (3, 3))
    with pytest.raises(ValueError, match="at least one"):
        K.sum_padded([], (3, 3))


def test_parallel_offsets_rejects_misaligned_branches():
    # 3x3 pad 1 and 1x3 pad 1 on both axes: same on axis 1, output heights differ on axis 0
    with pytest.raises(ValueError, match="axis 0"):
        K.parallel_offsets([((3, 3), ((1, 1), (1, 1))), ((1, 3), ((1, 1), (1, 1)))])
    # ACNet: 3x3 p1 + 1x3 p(0,1) + 3x1 p(1,0) merge into a 3x3 p1
    lo, hi, ks, offs = K.parallel_offsets(
        [((3, 3), ((1, 1), (1, 1))), ((1, 3), ((0, 0), (1, 1))), ((3, 1), ((1, 1), (0, 0)))])
    assert (lo, hi, ks, offs) == ((1, 1), (1, 1), (3, 3), [(0, 0), (1, 0), (0, 1)])


@given(gen=rng(), nd=st.sampled_from([0, 1, 2, 3]), c=st.integers(1, 8), data=st.data())
def test_identity_kernel(gen, nd, c, data):
    g = data.draw(st.sampled_from([q for q in range(1, c + 1) if c % q == 0]))
    x = randn(gen, 2, c, *([5] * nd))
    W = K.identity_kernel(c, g, nd)
    assert W.shape == (c, c // g, *([1] * nd)) and W.dtype == DT
    close(K.conv_nd(x, W, None, (1,) * nd, ((0, 0),) * nd, (1,) * nd, g), x)


@given(gen=rng(), nd=ND, c=st.integers(1, 8), data=st.data(), use_div=st.booleans())
def test_avgpool_kernel(gen, nd, c, data, use_div):
    k = tuple(data.draw(st.integers(1, 5 if nd < 3 else 3)) for _ in range(nd))
    s = tuple(data.draw(st.integers(1, 3)) for _ in range(nd))
    p = tuple(data.draw(st.integers(0, kk // 2)) for kk in k)
    div = data.draw(st.integers(1, 9)) if use_div and nd > 1 else None
    x = randn(gen, 2, c, *[max(kk, 5 if nd < 3 else 3) for kk in k])
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    kw = {"divisor_override": div} if div else {}
    ref = pool(x, k, s, p, ceil_mode=False, count_include_pad=True, **kw)
    W = K.avgpool_kernel(c, k, div)
    close(K.conv_nd(x, W, None, s, tuple((q, q) for q in p), (1,) * nd, c), ref)


# ---------------------------------------------------------------------------------------------------
def run_serial(x, W1, b1, g1, s1, d1, p1, W2, b2, g2, s2, d2, p2):
    return K.conv_nd(K.conv_nd(x, W1, b1, s1, p1, d1, g1), W2, b2, s2, p2, d2, g2)


def sizes_for_all_residues(nd, s, k, d, p, base):
    """Input sizes covering every residue modulo the total stride on each axis (kept small)."""
    out = []
    for r in range(max(s) if nd else 1):
        out.append(tuple(max(base[a] + r, d[a] * (k[a] - 1) + 1) for a in range(nd)))
    return out


@st.composite
def serial_case(draw, nd):
    c0, c1, g = draw(channels_groups())
    c2 = g * draw(st.integers(1, max(1, 8 // g)))
    pad2_zero = draw(st.booleans())
    g1 = draw(geometry(nd, max_k=5 if nd < 3 else 3))
    g2 = draw(geometry(nd, max_k=5 if nd < 3 else 3, max_pad=0 if pad2_zero else 2))
    return (c0, c1, c2, g), g1, g2, draw(st.booleans()), draw(st.booleans())


@given(gen=rng(), nd=st.sampled_from([0, 1, 2, 3]), data=st.data())
def test_compose_serial(gen, nd, data):
    """Whenever serial_is_exact says None, the composite equals both convs for every input size."""
    (c0, c1, c2, g), (k1, s1, d1, p1), (k2, s2, d2, p2), bias1, bias2 = data.draw(serial_case(nd))
    W1, b1 = randn(gen, c1, c0 // g, *k1), randn(gen, c1) if bias1 else None
    W2, b2 = randn(gen, c2, c1 // g, *k2), randn(gen, c2) if bias2 else None
    reason = K.serial_is_exact(k1, b1 is None, s1, d1, p1, p2)
    assume(reason is None)
    W, b, gc, s, d, p = K.compose_serial(W1, b1, g, s1, d1, p1, W2, b2, g, s2, d2, p2)
    assert gc == g and s == tuple(a * c for a, c in zip(s1, s2))
    # smallest input for which the chain has an output on every axis
    eff1 = [d1[a] * (k1[a] - 1) + 1 for a in range(nd)]
    eff2 = [d2[a] * (k2[a] - 1) + 1 for a in range(nd)]
    need = [s1[a] * (max(eff2[a] - p2[a][0] - p2[a][1], 1) - 1) + eff1[a] - p1[a][0] - p1[a][1]
            for a in range(nd)]
    small = 3 if nd == 3 else 5
    for extra in range(max(s) if nd else 1):
        size = tuple(max(need[a], 1, small) + extra for a in range(nd))
        x = randn(gen, 2, c0, *size)
        close(K.conv_nd(x, W, b, s, p, d, g), run_serial(x, W1, b1, g, s1, d1, p1, W2, b2, g, s2, d2, p2))


@given(gen=rng(), nd=st.sampled_from([1, 2]), data=st.data())
def test_serial_is_exact_reasons_are_real(gen, nd, data):
    """When serial_is_exact refuses and conv2 reads all its padded positions (stride 1, dilation 1,
    padding < kernel size), the composite really differs for some input size."""
    (c0, c1, c2, g), (k1, s1, d1, p1), _, bias1, _ = data.draw(serial_case(nd))
    k2 = tuple(data.draw(st.integers(1, 5)) for _ in range(nd))
    p2 = tuple((data.draw(st.integers(0, kk - 1)), data.draw(st.integers(0, kk - 1))) for kk in k2)
    s2 = d2 = (1,) * nd
    W1, b1 = randn(gen, c1, c0 // g, *k1), randn(gen, c1) if bias1 else None
    W2 = randn(gen, c2, c1 // g, *k2)
    reason = K.serial_is_exact(k1, b1 is None, s1, d1, p1, p2)
    assume(reason is not None)
    W, b, _, s, d, p = K.compose_serial(W1, b1, g, s1, d1, p1, W2, None, g, s2, d2, p2)
    base = [d1[a] * (k1[a] - 1) + 1 + 4 * s1[a] for a in range(nd)]
    found = False
    for r in range(max(s1)):
        x = randn(gen, 1, c0, *[bb + r for bb in base])
        ref = run_serial(x, W1, b1, g, s1, d1, p1, W2, None, g, s2, d2, p2)
        found |= differs(K.conv_nd(x, W, b, s, p, d, g), ref)
    assert found, reason


def test_serial_refusals_known_traps():
    gen = torch.Generator().manual_seed(1)
    # RepNeXt 1x11 (bias) -> 11x1 with zero padding: the bias leaks into the padded border
    assert K.serial_is_exact((1, 11), False, (1, 1), (1, 1), ((0, 0), (5, 5)), ((5, 5), (0, 0)))
    assert K.serial_is_exact((1, 11), True, (1, 1), (1, 1), ((0, 0), (5, 5)), ((5, 5), (0, 0))) is None
    W1, b1, W2 = randn(gen, 4, 1, 1, 11), randn(gen, 4), randn(gen, 4, 1, 11, 1)
    geo1, geo2 = ((1, 1), (1, 1), ((0, 0), (5, 5))), ((1, 1), (1, 1), ((5, 5), (0, 0)))
    W, b, g, s, d, p = K.compose_serial(W1, b1, 4, *geo1, W2, None, 4, *geo2)
    x = randn(gen, 1, 4, 14, 14)
    ref = run_serial(x, W1, b1, 4, *geo1, W2, None, 4, *geo2)
    got = K.conv_nd(x, W, b, s, p, d, g)
    assert differs(got, ref)
    close(got[..., 5:-5, :], ref[..., 5:-5, :])  # interior rows are fine
    # 3x3 p1 -> 3x3 p1: the second conv's padding is not what the first conv would compute
    reason = K.serial_is_exact((3, 3), True, (1, 1), (1, 1), ((1, 1), (1, 1)), ((1, 1), (1, 1)))
    assert reason and "axis 0" in reason
    W1, W2 = randn(gen, 3, 3, 3, 3), randn(gen, 3, 3, 3, 3)
    geo = ((1, 1), (1, 1), ((1, 1), (1, 1)))
    W, b, g, s, d, p = K.compose_serial(W1, None, 1, *geo, W2, None, 1, *geo)
    assert W.shape == (3, 3, 5, 5) and p == ((2, 2), (2, 2))
    x = randn(gen, 1, 3, 7, 8)
    assert differs(K.conv_nd(x, W, b, s, p, d, g), run_serial(x, W1, None, 1, *geo, W2, None, 1, *geo))
    # stride 2 in the first conv: the hi side depends on the input size's parity
    assert K.serial_is_exact((3,), True, (2,), (1,), ((1, 1),), ((0, 1),))
    assert K.serial_is_exact((3,), True, (2,), (1,), ((1, 1),), ((1, 0),)) is None


@pytest.mark.parametrize("c", [1, 4, 640])
def test_repnext_separable_stride(c):
    """1x3 stride (1,2) pad (0,1) -> 3x1 stride (2,1) pad (1,0), depthwise, no bias == 3x3 s2 p1."""
    gen = torch.Generator().manual_seed(2)
    W1, W2 = randn(gen, c, 1, 1, 3), randn(gen, c, 1, 3, 1)
    geo1 = ((1, 2), (1, 1), ((0, 0), (1, 1)))
    geo2 = ((2, 1), (1, 1), ((1, 1), (0, 0)))
    assert K.serial_is_exact((1, 3), True, geo1[0], geo1[1], geo1[2], geo2[2]) is None
    W, b, g, s, d, p = K.compose_serial(W1, None, c, *geo1, W2, None, c, *geo2)
    assert (W.shape, g, s, d, p) == ((c, 1, 3, 3), c, (2, 2), (1, 1), ((1, 1), (1, 1)))
    assert not b.any()
    for h, w in [(8, 8), (7, 9), (9, 6), (5, 5)]:
        x = randn(gen, 1, c, h, w)
        close(K.conv_nd(x, W, b, s, p, d, g), run_serial(x, W1, None, c, *geo1, W2, None, c, *geo2))


def test_compose_serial_sparse_dilation():
    """1x1 then a dilated 3x3: the composite keeps the dilation instead of a dense 5x5."""
    gen = torch.Generator().manual_seed(3)
    W1, b1, W2 = randn(gen, 4, 2, 1, 1), randn(gen, 4), randn(gen, 3, 4, 3, 3)
    geo1, geo2 = ((1, 1), (1, 1), ((0, 0), (0, 0))), ((1, 1), (2, 2), ((0, 0), (0, 0)))
    W, b, g, s, d, p = K.compose_serial(W1, b1, 1, *geo1, W2, None, 1, *geo2)
    assert W.shape == (3, 2, 3, 3) and d == (2, 2)
    x = randn(gen, 2, 2, 9, 10)
    close(K.conv_nd(x, W, b, s, p, d, g), run_serial(x, W1, b1, 1, *geo1, W2, None, 1, *geo2))


def test_inputs_not_modified():
    gen = torch.Generator().manual_seed(4)
    W1, b1, W2, b2 = randn(gen, 4, 1, 3, 3), randn(gen, 4), randn(gen, 4, 1, 3, 3), randn(gen, 4)
    s, t = randn(gen, 4), randn(gen, 4)
    copies = [v.clone() for v in (W1, b1, W2, b2, s, t)]
    K.fold_affine_after(W1, b1, s, t)
    K.fold_affine_before(W1, b1, 4, s, t)
    K.expand_groups(W1, 4, 1)
    K.redilate(W1, (2, 2), (1, 1))
    K.pad_kernel(W1, (1, 0), (0, 1))
    K.compose_serial(W1, b1, 4, (1, 1), (1, 1), ((1, 1),) * 2, W2, b2, 4, (1, 1), (1, 1), ((0, 0),) * 2)
    for v, c in zip((W1, b1, W2, b2, s, t), copies):
        assert torch.equal(v, c)
