"""Property-based tests (hypothesis) where a definition exists.

* ``upfirdn2d`` (forward and input gradient) against a literal, loop-free-of-our-helpers definition, over
  random shapes, kernels (1-D separable, 2-D), up/down factors (int or per axis) and pads (negative crops);
* z-bin assignment: ``floor(rank * n_zbins / depth)`` per volume, whatever the file order and the gaps in
  the slice numbering;
* slice counts and the latent path of synthetic volumes: ``(n_zbins - 1) * s + 1`` slices, bins exact;
* preprocessing -> restore: exact label round trips over random grids, spacings, label boxes, crops and
  flipped axes (no resampling, padded slices).

Example counts are small and derandomized by default (the ``ci`` profile of ``tests/conftest.py``), so
the suite is fast and reproducible; ``HYPOTHESIS_PROFILE=thorough`` explores 20x more examples.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALE = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 1


def examples(n: int):
    return settings(max_examples=n * SCALE)


# ----------------------------------------------------------------------------------------- upfirdn2d
def literal_upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up, down, pad) -> torch.Tensor:
    """Definition: insert up-1 zeros after every sample, pad each side by p (crop when p < 0), convolve
    (true convolution) with the kernel, keep every down-th sample. Written without op's helpers."""
    ux, uy = (up, up) if isinstance(up, int) else up
    dx, dy = (down, down) if isinstance(down, int) else down
    px0, px1, py0, py1 = (pad[0], pad[1], pad[0], pad[1]) if len(pad) == 2 else pad
    if kernel.ndim == 1:
        kernel = kernel[:, None] * kernel[None, :]
    b, c, h, w = x.shape
    zeros = x.new_zeros(b, c, h, uy, w, ux)
    zeros[:, :, :, 0, :, 0] = x
    u = zeros.reshape(b, c, h * uy, w * ux)
    u = F.pad(u, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    rows = slice(max(-py0, 0), max(u.shape[2] - max(-py1, 0), 0))  # never a negative (from the end) stop
    cols = slice(max(-px0, 0), max(u.shape[3] - max(-px1, 0), 0))
    u = u[:, :, rows, cols]
    kh, kw = kernel.shape
    oh, ow = u.shape[2] - kh + 1, u.shape[3] - kw + 1
    out = x.new_zeros(b, c, oh, ow)
    for i in range(kh):  # true convolution: out[y] = sum_t k[t] * u[y + kh - 1 - t]
        for j in range(kw):
            out = out + kernel[kh - 1 - i, kw - 1 - j] * u[:, :, i:i + oh, j:j + ow]
    return out[:, :, ::dy, ::dx]


factor = st.integers(1, 3)
factors = st.one_of(factor, st.tuples(factor, factor))
pads = st.one_of(st.lists(st.integers(-3, 4), min_size=2, max_size=2),
                 st.lists(st.integers(-3, 4), min_size=4, max_size=4))


@st.composite
def upfirdn_cases(draw):
    kind = draw(st.sampled_from(["1d", "separable", "full"]))
    kh = draw(st.integers(1, 5))
    kw = kh if kind == "1d" else draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    if kind == "1d":
        kernel = torch.randn(kh, dtype=torch.float64, generator=gen)
    elif kind == "separable":
        kernel = torch.outer(torch.randn(kh, dtype=torch.float64, generator=gen),
                             torch.randn(kw, dtype=torch.float64, generator=gen))
    else:
        kernel = torch.randn(kh, kw, dtype=torch.float64, generator=gen)
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 7)), draw(st.integers(2, 7)))
    x = torch.randn(*shape, dtype=torch.float64, generator=gen)
    return x, kernel, draw(factors), draw(factors), tuple(draw(pads))


@examples(60)
@given(upfirdn_cases())
def test_upfirdn2d_matches_its_definition(case):
    from op import upfirdn2d

    x, kernel, up, down, pad = case
    try:
        want = literal_upfirdn2d(x, kernel, up, down, pad)
    except RuntimeError:  # the definition itself has no output (crop larger than the signal)
        want = None
    assume(want is not None and want.shape[2] >= 1 and want.shape[3] >= 1)
    xg = x.clone().requires_grad_(True)
    got = upfirdn2d(xg, kernel, up, down, pad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the input gradient (the op's own backward) against autograd through the definition
    weight = torch.randn_like(want)
    (grad,) = torch.autograd.grad((got * weight).sum(), xg)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad((literal_upfirdn2d(xr, kernel, up, down, pad) * weight).sum(), xr)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------- z-bins
@st.composite
def slice_files(draw):
    n_vol = draw(st.integers(1, 3))
    names = []
    for v in range(n_vol):
        numbers = draw(st.lists(st.integers(0, 400), min_size=1, max_size=40, unique=True))
        names += [f"vol{v}_slice{n:03d}.npz" for n in numbers]
    return draw(st.permutations(names))


@examples(60)
@given(slice_files(), st.integers(1, 35))
def test_zbins_follow_the_rank_formula_whatever_the_order_and_gaps(paths, n_zbins):
    from robustmedseg.data.zbins import zbins_for_files

    bins = zbins_for_files(paths, n_zbins)
    assert bins.shape == (len(paths),)
    for v in {p.split("_slice")[0] for p in paths}:
        members = sorted((int(p.split("_slice")[1][:-4]), i) for i, p in enumerate(paths) if p.startswith(v + "_"))
        depth = len(members)
        got = [int(bins[i]) for _, i in members]
        assert got == [rank * n_zbins // depth for rank in range(depth)]
        assert got == sorted(got) and 0 <= got[0] and got[-1] <= n_zbins - 1
        if depth >= n_zbins:  # every bin used, counts differ by at most one
            counts = np.bincount(got, minlength=n_zbins)
            assert counts.min() >= 1 and counts.max() - counts.min() <= 1
    # the file order does not matter
    order = np.random.default_rng(len(paths)).permutation(len(paths))
    again = zbins_for_files([paths[i] for i in order], n_zbins)
    np.testing.assert_array_equal(again, bins[order])


# ----------------------------------------------------------------------------------------- slice counts
@examples(40)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 2 ** 16))
def test_latent_path_has_the_documented_slice_count_and_exact_bins(n_zbins, s, seed):
    from MultiMedSeg import generation as gen

    w = torch.randn(n_zbins, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    path = gen.interpolate_latents(w, s)
    n = (n_zbins - 1) * s + 1
    assert gen.slice_count(n_zbins, s) == n == path.shape[0]
    idx, frac = gen.interpolation_plan(n_zbins, s)
    assert idx.tolist() == [min(k // s, n_zbins - 1) for k in range(n)]
    for k in range(n):  # slice k sits at k / s on the bin axis
        i, j = divmod(k, s)
        if i == n_zbins - 1:
            assert torch.equal(path[k], w[i])
            continue
        assert frac[k] == pytest.approx(j / s)
        torch.testing.assert_close(path[k], w[i] + (j / s) * (w[i + 1] - w[i]))
    for i in range(n_zbins):
        assert torch.equal(path[i * s], w[i])


# ----------------------------------------------------------------------------------------- restore
@st.composite
def geometries(draw):
    from builders import Geometry

    spacing = draw(st.sampled_from([(1.0, 1.0, 1.0), (0.7, 0.9, 2.5), (1.5, 1.2, 0.8)]))
    out = []
    for _ in range(2):  # two volumes sharing the spacing: the target spacing is theirs (no resampling)
        shape = (draw(st.integers(6, 14)), draw(st.integers(6, 14)), draw(st.integers(5, 12)))
        box = []
        for axis, n in enumerate(shape):
            lo = draw(st.integers(1 if axis == 2 else 0, n - 3))  # z: never from the first slice
            box.append((lo, draw(st.integers(lo + 2, n))))
        out.append(Geometry(shape, spacing, tuple(box)))
    return out


@examples(12)
@given(geometries(), st.booleans(), st.sampled_from([None, 0, 1, 2]), st.integers(0, 4))
def test_preprocess_restore_round_trip_is_exact(geos, crop, flip_axis, extra):
    from builders import check_exact, round_trip, write_volumes

    size = max(max(g.shape) for g in geos) + extra  # no axis longer than the slices: no resampling
    with tempfile.TemporaryDirectory() as tmp:
        root = write_volumes(Path(tmp) / "src", geos)
        records = round_trip(root, Path(tmp) / "prep", size=max(size, 4), crop=crop, flip_axis=flip_axis)
        assert len(records) == 2
        check_exact(records)
