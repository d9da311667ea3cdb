"""Kernel math for structural reparameterization: pure tensor functions, no graph code.

Conventions: a conv weight ``W`` has shape ``[out, in/groups, *k]`` with ``nd = W.ndim - 2`` spatial
axes (``nd == 0``: ``W`` is ``[out, in]``, a Linear / 1x1 on a rank-2 input). Paddings are per axis
``((lo, hi), ...)``, applied as ``F.pad`` followed by a conv with padding 0. Stride and dilation are
tuples of length ``nd``. Inputs and outputs are float64 (callers cast the model's tensors to float64 once,
``sum_padded``, and ``fold_affine_after`` with a per-channel float64 scale, read narrower kernels as they are:
type promotion computes in float64); inputs are never modified in place. An input bias of ``None`` means
zero; returned biases are always tensors.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _bcast(v: Tensor, ndim: int) -> Tensor:
    """Per-output-channel vector (or 0-dim scalar) shaped to broadcast against a weight."""
    return v if v.ndim == 0 else v.reshape(-1, *([1] * (ndim - 1)))


def _bias(b: Tensor | None, W: Tensor) -> Tensor:
    return torch.zeros(W.shape[0], dtype=W.dtype, device=W.device) if b is None else b.clone()


def bn_scale_shift(running_mean, running_var, weight, bias, eps):
    """Inference BatchNorm as ``y = s*x + t``: ``s = w/sqrt(var+eps)``, ``t = b - mean*s``.

    ``weight``/``bias`` may be None (``affine=False``). Exact only with running statistics in eval mode.
    """
    s = torch.rsqrt(running_var + eps)
    if weight is not None:
        s = s * weight
    t = -running_mean * s
    return s, (t if bias is None else t + bias)


def fold_affine_after(W, b, s, t):
    """``s*conv(x; W, b) + t`` == ``conv(x; W*s[out], b*s + t)``. Always exact.

    ``s``/``t`` are ``[out]`` or 0-dim scalars; ``t`` may be None.
    """
    b2 = _bias(b, W) * s
    return W * _bcast(s, W.ndim), (b2 if t is None else b2 + t)


def _grouped(W: Tensor, groups: int) -> Tensor:
    """View ``[out, in/g, *k]`` as ``[g, out/g, in/g, *k]``."""
    return W.reshape(groups, W.shape[0] // groups, *W.shape[1:])


def fold_affine_before(W, b, groups, s, t):
    """``conv(s*x + t; W, b)`` == ``conv(x; W*s[in], b + sum_{i,taps} W[o,i,taps]*t[in])``.

    ``s``/``t`` are per input channel (``[W.shape[1]*groups]``) or 0-dim; ``t`` may be None.
    Exact only if the conv has no zero padding or ``t`` is zero (padded zeros would not be shifted
    by ``t``); the caller checks.
    """
    Wg = _grouped(W, groups)
    extra = [1] * (W.ndim - 2)
    if s.ndim == 0:
        W2 = W * s
    else:
        W2 = (Wg * s.reshape(groups, 1, -1, *extra)).reshape(W.shape)
    b2 = _bias(b, W)
    if t is None:
        return W2, b2
    one_tap = W.ndim == 2 or math.prod(W.shape[2:]) == 1
    taps = Wg.reshape(Wg.shape[:3]) if one_tap else Wg.flatten(3).sum(3)  # [g, out/g, in/g]
    if t.ndim == 0:
        return W2, b2 + taps.sum(2).reshape(-1) * t
    return W2, b2 + (taps @ t.reshape(groups, -1, 1)).reshape(-1)


def expand_groups(W, groups, new_groups):
    """Re-express a ``groups``-grouped kernel in the coarser grouping ``new_groups`` (which divides
    ``groups``): block-diagonal ``[out, in/new_groups, *k]`` with zeros across original groups. Exact."""
    if groups % new_groups:
        raise ValueError(f"new_groups={new_groups} does not divide groups={groups}")
    r = groups // new_groups
    if r == 1:
        return W.clone()
    o, i, k = W.shape[0] // groups, W.shape[1], W.shape[2:]
    Wv = W.reshape(new_groups, r, 1, o, i, *k)
    eye = torch.eye(r, dtype=W.dtype, device=W.device).reshape(1, r, r, 1, 1, *[1] * len(k))
    # [new_g, r (old group in new), r (input block), o, i, *k] -> [new_g, r, o, r, i, *k] = [out, r*i, *k]
    W2 = (Wv * eye).permute(0, 1, 3, 2, 4, *range(5, 5 + len(k)))
    return W2.reshape(W.shape[0], r * i, *k)


def redilate(W, dilation, new_dilation):
    """Insert ``dilation[a]/new_dilation[a] - 1`` zeros between taps on each axis so that
    ``conv(W2, dilation=new_dilation) == conv(W, dilation=dilation)``. Exact; needs divisibility."""
    f = []
    for a, (d, nd_) in enumerate(zip(dilation, new_dilation)):
        if d % nd_:
            raise ValueError(f"axis {a}: new dilation {nd_} does not divide dilation {d}")
        f.append(d // nd_)
    k = W.shape[2:]
    W2 = W.new_zeros(*W.shape[:2], *[(kk - 1) * ff + 1 for kk, ff in zip(k, f)])
    W2[(slice(None), slice(None), *[slice(None, None, ff) for ff in f])] = W
    return W2


def pad_kernel(W, before, after):
    """Zero-pad the kernel's spatial axes by ``before[a]``/``after[a]`` taps. Exact when the conv's
    padding grows by the same amounts (see ``parallel_offsets``). One fresh tensor, written once: the
    kernel is copied into its window of a zero tensor (``F.pad`` of a big float64 kernel is several times
    slower)."""
    if not any(before) and not any(after):
        return W.clone()
    size = tuple(k + lo + hi for k, lo, hi in zip(W.shape[2:], before, after))
    out = W.new_zeros(*W.shape[:2], *size)
    out[_window(W.shape[2:], before)] = W
    return out


def _window(kernel_size, offset) -> tuple:
    """The index of a kernel of ``kernel_size`` placed at ``offset`` in a larger kernel."""
    return (slice(None), slice(None), *(slice(o, o + k) for o, k in zip(offset, kernel_size)))


def sum_padded(terms, size):
    """``Σ cᵢ·pad(Wᵢ)``: kernels ``Wᵢ`` (``[out, in/g, *kᵢ]``, each placed at tap offset ``oᵢ`` in a kernel of
    ``size``) times scalars ``cᵢ``, summed into one fresh float64 ``[out, in/g, *size]`` tensor. ``terms`` are
    ``(W, offset, c)``; each ``W`` is float64 or a narrower floating dtype, read exactly as float64 (no float64
    copy of it is made). The result is written in place, window by window: a term that fills the whole
    kernel starts it (``c·W``, one write), the others are added into their windows; no padded or scaled
    copies are made. Exact in the sense of float64 summation (the same sums as padding then adding)."""
    terms = list(terms)
    if not terms:
        raise ValueError("sum_padded needs at least one kernel")
    size = tuple(size)
    for W, off, _ in terms:
        if W.ndim - 2 != len(size) or any(o < 0 or o + k > s for o, k, s in zip(off, W.shape[2:], size)):
            raise ValueError(f"kernel {tuple(W.shape)} at offset {tuple(off)} does not fit in size {size}")
    full = next((k for k, (W, off, _) in enumerate(terms) if tuple(W.shape[2:]) == size), None)
    if full is None:
        first = terms[0][0]
        out = first.new_zeros(*first.shape[:2], *size, dtype=torch.float64)
    else:
        W, _, c = terms.pop(full)
        out = W.to(torch.float64, copy=True)
        if c != 1:
            out.mul_(c)
    for W, off, c in terms:
        view = out[_window(W.shape[2:], off)]
        if c == 1:
            view.add_(W)
        elif c == -1:
            view.sub_(W)
        else:
            view.add_(W, alpha=c)
    return out


def identity_kernel(channels, groups, nd):
    """1-tap kernel ``[C, C/groups, *(1,)*nd]`` with ``W[c, c % (C/groups)] = 1``: ``conv(x, W) == x``."""
    per = channels // groups
    W = torch.zeros(channels, per, *([1] * nd), dtype=torch.float64)
    c = torch.arange(channels)
    W[(c, c % per, *([0] * nd))] = 1.0
    return W


def avgpool_kernel(channels, kernel_size, divisor=None):
    """Depthwise kernel ``[C, 1, *k]`` of ``1/prod(k)`` (or ``1/divisor``): equals AvgPool with
    ``count_include_pad=True`` (or no padding), ``ceil_mode=False``, used with ``groups=C``."""
    d = math.prod(kernel_size) if divisor is None else divisor
    return torch.full((channels, 1, *kernel_size), 1.0 / d, dtype=torch.float64)


def parallel_offsets(geoms):
    """Merge geometry for a sum of convs of one input (same stride) into one conv.

    ``geoms``: per branch ``(effective_kernel_size, ((lo, hi), ...))`` of dense kernels. Per axis the
    branch reads taps ``a_i = -lo_i .. e_i = k_i - 1 - lo_i`` around each output's anchor pixel, with
    slack ``R_i = lo_i + hi_i - (k_i - 1)``. Equal slacks (equal output sizes for every input) are
    required. Returns ``(pad_lo, pad_hi, kernel_size, offsets)`` with ``lo = max lo_i``,
    ``hi = R + max e_i``, ``k = max e_i - min a_i + 1`` and ``offsets[i][a] = lo - lo_i``.
    """
    if not geoms:
        raise ValueError("parallel_offsets needs at least one branch")
    nd = len(geoms[0][0])
    if any(len(k) != nd or len(p) != nd for k, p in geoms):
        raise ValueError("branches have different numbers of spatial axes")
    lo_m, hi_m, ks = [], [], []
    for a in range(nd):
        slacks = {p[a][0] + p[a][1] - (k[a] - 1) for k, p in geoms}
        if len(slacks) != 1:
            raise ValueError(
                f"axis {a}: branches have different padding slack lo+hi-(k-1) {sorted(slacks)}; "
                "their output sizes differ for some input size")
        lo = max(p[a][0] for _, p in geoms)
        e = max(k[a] - 1 - p[a][0] for k, p in geoms)
        lo_m.append(lo)
        hi_m.append(slacks.pop() + e)
        ks.append(e + lo + 1)
    offsets = [tuple(lo_m[a] - p[a][0] for a in range(nd)) for _, p in geoms]
    return tuple(lo_m), tuple(hi_m), tuple(ks), offsets


@functools.lru_cache(maxsize=256)
def _tap_index(k1, k2, step1, step2, device):
    """Composite kernel size and, for each tap pair (j of k2, l of k1) flattened row-major, the
    flat composite tap ``j*step2 + l*step1``."""
    nd = len(k1)
    size = tuple((a - 1) * s2 + (b - 1) * s1 + 1 for a, b, s1, s2 in zip(k2, k1, step1, step2))
    index = torch.zeros((1,) * 2 * nd, dtype=torch.long)
    for a in range(nd):
        mult, shape = math.prod(size[a + 1:]), [1] * 2 * nd
        shape[a] = k2[a]
        index = index + (torch.arange(k2[a]) * (step2[a] * mult)).reshape(shape)
        shape[a], shape[nd + a] = 1, k1[a]
        index = index + (torch.arange(k1[a]) * (step1[a] * mult)).reshape(shape)
    return size, index.flatten().to(device)


def compose_serial(W1, b1, groups1, stride1, dilation1, pad1, W2, b2, groups2, stride2, dilation2, pad2):
    """``conv2(conv1(x))`` as one conv (both with the same groups ``g``).

    Tap ``j*d2*s1 + l*d1`` accumulates ``W2[:, :, j] @ W1[:, :, l]`` per group; stride ``s1*s2``;
    padding ``lo1 + lo2*s1`` / ``hi1 + hi2*s1``; bias ``b2 + sum_j W2[:, :, j] @ b1``. The returned
    dilation is the gcd of the tap steps actually used (1 when both kernels are 1-tap), so the kernel
    holds no all-zero tap rows. Exact only when ``serial_is_exact(...)`` returns None.
    Returns ``(W, b, groups, stride, dilation, pad)``.
    """
    if groups1 != groups2:
        raise ValueError(f"compose_serial needs equal groups, got {groups1} and {groups2}")
    g, nd = groups1, W1.ndim - 2
    if W2.ndim != W1.ndim or W2.shape[1] * g != W1.shape[0]:
        raise ValueError(f"conv2 weight {tuple(W2.shape)} does not consume conv1 weight {tuple(W1.shape)}")
    if nd == 0:  # Linear: treat as 1-tap 1d convs
        W, b, *_ = compose_serial(W1[..., None], b1, g, (1,), (1,), ((0, 0),),
                                  W2[..., None], b2, g, (1,), (1,), ((0, 0),))
        return W[..., 0], b, g, (), (), ()
    k1, k2 = W1.shape[2:], W2.shape[2:]
    dil, tap2, tap1 = [], [], []  # composite dilation; tap steps of W2 and W1 in its units
    for a in range(nd):
        step2, step1 = dilation2[a] * stride1[a], dilation1[a]
        steps = ([step2] if k2[a] > 1 else []) + ([step1] if k1[a] > 1 else [])
        d = math.gcd(*steps) if steps else 1
        dil.append(d)
        tap2.append(step2 // d if k2[a] > 1 else 1)
        tap1.append(step1 // d if k1[a] > 1 else 1)
    # Products of every tap pair (per group), summed into composite tap j*S + l*D.
    c2, m, ci = W2.shape[0] // g, W2.shape[1], W1.shape[1]
    J, L = math.prod(k2), math.prod(k1)
    A = _grouped(W2, g).reshape(g, c2, m, J).transpose(2, 3).reshape(g, c2 * J, m)
    B = _grouped(W1, g).reshape(g, m, ci * L)
    P = (A * B if m == 1 else torch.bmm(A, B)).reshape(g, c2, J, ci, L).transpose(2, 3).reshape(g, c2, ci, J * L)
    size, index = _tap_index(tuple(k1), tuple(k2), tuple(tap1), tuple(tap2), W1.device)
    W = P.new_zeros(g, c2, ci, math.prod(size)).index_add_(3, index, P).reshape(g * c2, ci, *size)
    b = _bias(b2, W2)
    if b1 is not None:
        taps = _grouped(W2, g).flatten(3).sum(3)  # [g, c2, m]
        b = b + (taps @ b1.reshape(g, m, 1)).reshape(-1)
    stride = tuple(s1 * s2 for s1, s2 in zip(stride1, stride2))
    pad = tuple((p1[0] + p2[0] * s1, p1[1] + p2[1] * s1) for p1, p2, s1 in zip(pad1, pad2, stride1))
    return W, b, g, stride, tuple(dil), pad


def serial_is_exact(k1, b1_is_zero, stride1, dilation1, pad1, pad2):
    """None if ``compose_serial`` is exact for every input size, else the reason it is not.

    The composite conv evaluates conv1 also at the virtual positions that conv2's zero padding
    covers (``-lo2..-1`` and ``L1..L1+hi2-1``); there it must give exactly 0, i.e. conv1 has no bias
    and reads only padded x positions (outside ``[0, H)`` for every ``H``). Conservative: every
    padded position is assumed to be read by conv2.
    """
    for a, (k, s, d, (lo1, hi1), (lo2, hi2)) in enumerate(zip(k1, stride1, dilation1, pad1, pad2)):
        if lo2 <= 0 and hi2 <= 0:
            continue
        if not b1_is_zero:
            return (f"axis {a}: the first conv has a bias and the second zero-pads its output "
                    f"(pad {(lo2, hi2)}); the padded border would see the bias")
        ext = d * (k - 1)
        if lo2 > 0 and -s + ext - lo1 >= 0:
            return (f"axis {a}: the second conv's padding (lo={lo2}) covers positions where the first "
                    f"conv (k={k}, stride={s}, dilation={d}, pad lo={lo1}) would read real input")
        if hi2 > 0:
            K = 4 * (ext + lo1 + hi1 + s) + 8
            for H in range(K, K + s):
                L1 = (H + lo1 + hi1 - ext - 1) // s + 1
                if s * L1 - lo1 < H:
                    return (f"axis {a}: the second conv's padding (hi={hi2}) covers positions where the "
                            f"first conv (k={k}, stride={s}, dilation={d}, pad hi={hi1}) would read real "
                            f"input (e.g. input size {H})")
    return None


def conv_nd(x, W, b, stride, pad, dilation, groups):
    """Reference conv with asymmetric zero padding: ``F.pad`` then ``F.conv{nd}d`` with padding 0
    (``nd == 0``: grouped Linear on a rank-2 input). Grouped float64 convs go through ``grouped_conv``."""
    nd = W.ndim - 2
    if nd == 0:
        if groups == 1:
            return F.linear(x, W, b)
        return F.conv1d(x[..., None], W[..., None], b, groups=groups)[..., 0]
    flat = [p for a in reversed(range(nd)) for p in pad[a]]
    x = F.pad(x, flat) if any(flat) else x
    if groups > 1 and x.dtype == torch.float64 and x.device.type == "cpu":
        # torch's float64 CPU conv loops over groups (~4 µs each): with many groups, go around it
        taps = math.prod(W.shape[2:])
        if x.numel() * taps <= GROUPED_CONV_CHUNK // 16:
            return grouped_conv(x, W, b, stride, dilation, groups)
        if 3 * taps < groups:
            return tapwise_conv(x, W, b, stride, dilation, groups)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, W, b, tuple(stride), 0, tuple(dilation), groups)


GROUPED_CONV_CHUNK = 1 << 22  # elements of the windowed input materialized at once (32 MiB in float64)


def _grouped_geometry(x, W, stride, dilation, groups):
    """nd, batch, input size, groups, input and output channels per group, kernel size, output size of an
    unpadded grouped conv of ``x`` by ``W``."""
    nd = W.ndim - 2
    n, c, *size = x.shape
    g, m, p, k = groups, c // groups, W.shape[0] // groups, W.shape[2:]
    out = [(s - d * (kk - 1) - 1) // st + 1 for s, kk, d, st in zip(size, k, dilation, stride)]
    if any(o <= 0 for o in out):
        raise RuntimeError(f"input of spatial size {tuple(size)} is smaller than the kernel extent")
    return nd, n, size, g, m, p, k, out


def grouped_conv(x, W, b, stride, dilation, groups):
    """An unpadded grouped conv as one batched matmul per chunk of groups: the windows of ``x`` (a strided
    view, ``Tensor.unfold`` per axis) times each group's kernel. The same sum as ``F.conv{nd}d``, but
    without torch's per-group loop, which dominates its float64 CPU path for depthwise kernels
    (10-50x slower than this on small inputs)."""
    nd, n, size, g, m, p, k, out = _grouped_geometry(x, W, stride, dilation, groups)
    u = x.reshape(n, g, m, *size)
    for a in range(nd):  # append one window axis per spatial axis: [n, g, m, *out, *extent]
        u = u.unfold(3 + a, dilation[a] * (k[a] - 1) + 1, stride[a])
    if any(d > 1 for d in dilation):
        u = u[(Ellipsis, *(slice(None, None, d) for d in dilation))]
    # [n, g, *out, m, *k]: a row of windows per output position, matching W's [p, m, *k] layout
    u = u.permute(0, 1, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
    taps, positions = m * math.prod(k), math.prod(out)
    Wg = W.reshape(g, p, taps).transpose(1, 2)  # [g, taps, p]
    step = max(1, GROUPED_CONV_CHUNK // max(1, n * positions * taps))
    parts = [torch.matmul(u[:, j:j + step].reshape(n, -1, positions, taps), Wg[j:j + step])
             for j in range(0, g, step)]  # each [n, step, positions, p]
    y = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    y = y.transpose(2, 3).reshape(n, g * p, *out)
    return y if b is None else y + b.reshape(1, -1, *([1] * nd))


def tapwise_conv(x, W, b, stride, dilation, groups):
    """An unpadded grouped conv as a sum over kernel taps: each tap's strided slice of ``x`` times that tap's
    weights, for all groups at once (an ``addcmul`` when each group reads one channel, a batched matmul
    otherwise). The same sum as ``F.conv{nd}d``; no windowed copy of the input, one op per tap."""
    nd, n, size, g, m, p, k, out = _grouped_geometry(x, W, stride, dilation, groups)
    xg = x.reshape(n, g, m, *size)
    Wg = W.reshape(g, p, m, -1)
    y = x.new_zeros(n, g, p, *out)
    for t, tap in enumerate(itertools.product(*(range(kk) for kk in k))):
        window = (slice(None),) * 3 + tuple(slice(j * d, j * d + s * (o - 1) + 1, s)
                                            for j, d, s, o in zip(tap, dilation, stride, out))
        xs = xg[window]
        if m == 1:
            y.addcmul_(xs, Wg[:, :, 0, t].reshape(1, g, p, *([1] * nd)))
        else:
            y += torch.matmul(Wg[:, :, :, t], xs.reshape(n, g, m, -1)).reshape(y.shape)
    y = y.reshape(n, g * p, *out)
    return y if b is None else y + b.reshape(1, -1, *([1] * nd))


def conv_matrix(W, b, in_shape, stride, pad, dilation, groups, padding_mode="zeros"):
    """A conv on inputs of the fixed per-sample shape ``in_shape`` (C, *spatial) as a dense matrix on the
    flattened sample: (M, m) with conv(x).flatten(1) = x.flatten(1) @ Mᵀ + m. M is the conv (without its bias)
    applied to the identity basis of C·∏spatial, its zero padding (or ``padding_mode``) included; m is the bias
    repeated over the output positions. Float64 in, float64 out."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=W.dtype, device=W.device).reshape(n, *in_shape)
    if padding_mode != "zeros":
        basis = F.pad(basis, [p for a in reversed(range(len(pad))) for p in pad[a]], mode=padding_mode)
        pad = tuple((0, 0) for _ in pad)
    out = conv_nd(basis, W, None, stride, pad, dilation, groups)  # [n, O, *spatial']
    M = out.reshape(n, -1).t().contiguous()
    m = _bias(b, W).repeat_interleave(math.prod(out.shape[2:]))
    return M, m
