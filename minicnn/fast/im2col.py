"""Fast im2col variants for stride-1 convolutions: flat columns, and outputs in pairs.

The reference im2col (minicnn/im2col.py) copies OH short rows per kernel
offset. With stride 1 every kernel offset is one shift of the flattened
image, so the copy is a single strided read (:func:`im2col_flat`), and col2im
is one sum over a strided view (:func:`col2im_flat_rows`). A layer with few
filters can take its outputs in pairs (:func:`im2col_flat_pairs`), which
makes products BLAS runs faster. docs/backprop.md walks through both on a
4x4 example; the tests compare every function here with its definition and
with the reference.
"""

from __future__ import annotations

from minicnn import backend


# --- Stride 1: every kernel offset is a shift of the flattened image ---------------
#
# With stride 1, output (oh, ow) at kernel offset (i, j) reads x_pad[c, oh + i, ow + j].
# Number the pixels of a padded Hp x Wp image row by row, q = row * Wp + col, and
# number the outputs on a grid of OH rows of Wp (not OW) columns the same way,
# q = oh * Wp + ow: then output q reads pixel q + (i * Wp + j). So the offset-(i, j)
# row of cols is the flattened image shifted by i*Wp + j, one contiguous slice, and
# im2col is a single strided copy instead of a copy of OH short rows per offset.
#
# The price: the grid has Wp - OW extra columns per row (ow >= OW) whose "window"
# wraps around into the next row. They are computed and cropped away (a 5x5 kernel
# on a 32x32 image: 28 x 32 outputs for 28 x 28 windows); in backward their dY is 0, so they
# add nothing to dW or dx. The last row's extra columns would read past the image:
# their cols are set to 0 instead.

def im2col_flat(x_pad, kh: int, kw: int, out=None):
    """Stride-1 im2col of an already padded, C-contiguous (N, C, Hp, Wp) array.

    Returns one cols matrix per image, shape (N, C*kh*kw, OH*Wp)::

        cols[n, (c, i, j), q] = x_pad.reshape(N, C, Hp*Wp)[n, c, q + i*Wp + j]

    for q < L = (OH-1)*Wp + OW, and 0 for the last row's extra columns q >= L.
    The largest index read is L-1 + (kh-1)*Wp + kw-1 = Hp*Wp - 1: every read
    stays inside its own image.
    """
    xp = backend.array_module(x_pad)
    n, c, hp, wp = x_pad.shape
    if not x_pad.flags.c_contiguous:
        raise ValueError("im2col_flat needs a C-contiguous array")
    oh, ow = hp - kh + 1, wp - kw + 1
    length = (oh - 1) * wp + ow
    size = x_pad.itemsize
    shifted = xp.lib.stride_tricks.as_strided(            # [n, c, i, j, q] -> x_pad[n, c, q + i*Wp + j]
        x_pad, (n, c, kh, kw, length),
        tuple(size * step for step in (c * hp * wp, hp * wp, wp, 1, 1)))   # only read from
    count = n * c * kh * kw * oh * wp
    cols = xp.empty(count, x_pad.dtype) if out is None else out.reshape(-1)[:count]
    cols = cols.reshape(n, c, kh, kw, oh * wp)
    cols[..., :length] = shifted
    cols[..., length:] = 0
    return cols.reshape(n, c * kh * kw, oh * wp)


def col2im_flat(dcols, x_pad_shape, kh: int, kw: int):
    """Adjoint of :func:`im2col_flat`: (N, C*kh*kw, OH*Wp) -> dx_pad of shape (N, C, Hp, Wp).

    dx_pad_flat[n, c, q + i*Wp + j] += dcols[n, (c, i, j), q] for q < L, one
    shifted slice per offset (i, j).
    """
    xp = backend.array_module(dcols)
    n, c, hp, wp = x_pad_shape
    oh, ow = hp - kh + 1, wp - kw + 1
    length = (oh - 1) * wp + ow
    dcols = dcols.reshape(n, c, kh, kw, oh * wp)
    dx_pad = xp.zeros((n, c, hp * wp), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            shift = i * wp + j
            dx_pad[:, :, shift:shift + length] += dcols[:, :, i, j, :length]
    return dx_pad.reshape(n, c, hp, wp)


def col2im_flat_rows(rows, x_pad_shape, kh: int, kw: int):
    """:func:`col2im_flat` as one sum over a strided view instead of kh*kw shifted adds.

    ``rows`` is (N, C*kh*kw, Hp*Wp): each row of dcols followed by zeros, so
    rows[n, r, q] = dcols[n, r, q] for q < L and 0 for q >= L. Then
    dx_pad_flat[n, c, q] = sum over (i, j) of rows[n, (c, i, j), q - (i*Wp + j)],
    and that entry lies at

        (n*C*kh*kw + c*kh*kw + i*kw + j) * Hp*Wp + q - i*Wp - j,

    which is linear in (n, c, i, j, q): a single as_strided view. Where
    q - (i*Wp + j) is out of [0, L), the address falls in the zeros after this
    row or after the row before it (no window wraps further back than
    (kh-1)*Wp + kw-1 = Hp*Wp - L, the length of those zeros; the first row has
    shift 0), so it adds 0, as the shifted adds would have skipped it.
    """
    xp = backend.array_module(rows)
    n, c, hp, wp = x_pad_shape
    r = hp * wp
    if rows.shape != (n, c * kh * kw, r) or not rows.flags.c_contiguous:
        raise ValueError(f"col2im_flat_rows needs C-contiguous rows of shape "
                         f"{(n, c * kh * kw, r)}, got {tuple(rows.shape)}")
    steps = (c * kh * kw * r, kh * kw * r, kw * r - wp, r - 1, 1)     # n, c, i, j, q
    view = xp.lib.stride_tricks.as_strided(rows, (n, c, kh, kw, r),
                                           tuple(rows.itemsize * step for step in steps))
    return view.sum(axis=(2, 3)).reshape(n, c, hp, wp)


# --- Stride 1, outputs in pairs: twice the filters, half the columns -----------------
#
# A layer with few filters (say 6) makes W @ cols a product with very few rows, which
# BLAS runs at a fraction of its speed. Two neighbouring outputs
# q = 2*q2 and q = 2*q2 + 1 of the flat grid read windows that overlap in all but one
# column: together they read the kh x (kw+1) patch that starts at pixel 2*q2. So
# one column of kh*(kw+1) pixels per channel serves both, and the weights come twice,
# as W' = [W with a zero column after it; W with a zero column before it] (2*OC rows):
#
#     out[(oc, p), q2] = sum over (c, i, j') of W'[(oc, p), (c, i, j')] * x_pad[c, 2*q2 + i*Wp + j']
#                      = out[oc, 2*q2 + p]        with W'[(oc, p), (c, i, j')] = W[oc, c, i, j' - p]
#
# Half as many columns, each 1 + 1/kw times as tall, and twice the rows: for 6 filters
# of 3x5x5 on a 32x32 image, 12 x 90 times 90 x 448 instead of 6 x 75 times 75 x 896,
# about 20% more multiply-adds at a shape BLAS runs faster (docs/performance.md). With Wp even, output (oh, ow) is pair
# q2 = oh*Wp/2 + ow//2, position p = ow % 2: the products come out as (OC, 2, OH, Wp/2),
# the even columns of the grid, then the odd ones.

def im2col_flat_pairs(x_pad, kh: int, kw: int, out=None):
    """Stride-1 im2col for outputs in pairs, of a C-contiguous (N, C, Hp, Wp) array with
    Wp even and kw odd. Returns (N, C*kh*(kw+1), OH*Wp/2)::

        cols[n, (c, i, j'), q2] = x_pad.reshape(N, C, Hp*Wp)[n, c, 2*q2 + i*Wp + j']

    for q2 < L/2 (L = (OH-1)*Wp + OW, even here, as in :func:`im2col_flat`), and 0
    for q2 >= L/2. The largest index read is L-2 + (kh-1)*Wp + kw = Hp*Wp - 1 (kw odd
    and Wp even make L even): every read stays inside its own image. The reads go
    through a copy of x_pad with its even and odd pixels apart (comment below).
    """
    xp = backend.array_module(x_pad)
    n, c, hp, wp = x_pad.shape
    if not x_pad.flags.c_contiguous or wp % 2 or kw % 2 == 0:
        raise ValueError("im2col_flat_pairs needs a C-contiguous array, Wp even and kw odd")
    oh, ow = hp - kh + 1, wp - kw + 1
    pairs = ((oh - 1) * wp + ow) // 2
    # Pixel 2*q2 + i*Wp + j' with j' = 2a + b is pixel q2 + i*Wp/2 + a of the image's
    # pixels at even (b = 0) or odd (b = 1) positions. Split into those two halves,
    # every row of cols is one contiguous slice of a half (a strided read of every
    # other pixel would be several times slower).
    half = hp * wp // 2
    halves = xp.ascontiguousarray(x_pad.reshape(n, c, half, 2).transpose(0, 1, 3, 2))
    size = halves.itemsize
    shifted = xp.lib.stride_tricks.as_strided(   # [n, c, i, a, b, q2] -> halves[n, c, b, q2 + i*Wp/2 + a]
        halves, (n, c, kh, (kw + 1) // 2, 2, pairs),
        tuple(size * step for step in (c * 2 * half, 2 * half, wp // 2, 1, half, 1)))
    count = n * c * kh * (kw + 1) * oh * wp // 2
    cols = xp.empty(count, x_pad.dtype) if out is None else out.reshape(-1)[:count]
    cols = cols.reshape(n, c, kh, (kw + 1) // 2, 2, oh * wp // 2)      # j' = 2a + b as (a, b)
    cols[..., :pairs] = shifted                                     # shifted is only read from
    cols[..., pairs:] = 0
    return cols.reshape(n, c * kh * (kw + 1), oh * wp // 2)


def paired_weight(weight):
    """W' of the outputs in pairs: (OC, C, kh, kw) -> (OC*2, C*kh*(kw+1)), see above."""
    xp = backend.array_module(weight)
    oc, c, kh, kw = weight.shape
    paired = xp.zeros((oc, 2, c, kh, kw + 1), dtype=weight.dtype)
    paired[:, 0, :, :, :kw] = weight          # p = 0: the window starts at the patch's column 0
    paired[:, 1, :, :, 1:] = weight           # p = 1: one column later
    return paired.reshape(oc * 2, c * kh * (kw + 1))


def unpaired_weight_grad(d_paired, weight_shape):
    """The adjoint of :func:`paired_weight`: dW[oc, c, i, j] = dW'[(oc, 0), (c, i, j)]
    + dW'[(oc, 1), (c, i, j + 1)], each weight's gradient from both of its copies."""
    oc, c, kh, kw = weight_shape
    d_paired = d_paired.reshape(oc, 2, c, kh, kw + 1)
    return d_paired[:, 0, :, :, :kw] + d_paired[:, 1, :, :, 1:]
