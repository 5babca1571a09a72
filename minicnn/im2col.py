"""im2col / col2im: the index plumbing that turns convolution into one matrix product.

For an input x of shape (N, C, H, W), a kh x kw kernel, stride s and zero
padding p, the output has OH = (H + 2p - kh) // s + 1 rows (OW likewise).
im2col copies every receptive field into a column::

    cols[(c, i, j), (n, oh, ow)] = x_pad[n, c, oh*s + i, ow*s + j]

so a convolution with weight w (OC, C, kh, kw) is the product
``w.reshape(OC, C*kh*kw) @ cols``. The copy is done by looping over the
kh*kw kernel offsets (i, j): each offset is one strided slice of x_pad, so the
Python loop runs kh*kw times, never once per pixel.

col2im is the adjoint (transpose) of im2col: each column entry is added back
to the pixel it was copied from. Overlapping windows make pixels receive
several contributions; the same offset loop with ``+=`` on slices sums them
without a scatter-add (no ``np.add.at``).
"""

from __future__ import annotations

from minicnn import backend


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Number of window positions along one axis: (size + 2p - k) // s + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def pad_hw(x, padding: int, value: float = 0.0):
    """Pad the two spatial axes of an (N, C, H, W) array with ``value``."""
    if padding == 0:
        return x
    xp = backend.array_module(x)
    n, c, h, w = x.shape
    out = xp.full((n, c, h + 2 * padding, w + 2 * padding), value, dtype=x.dtype)
    out[:, :, padding:padding + h, padding:padding + w] = x
    return out


def window_view(x_pad, i: int, j: int, stride: int, oh: int, ow: int):
    """The (N, C, OH, OW) slice of x_pad seen by kernel offset (i, j)."""
    return x_pad[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]


def im2col(x, kh: int, kw: int, stride: int = 1, padding: int = 0, out=None):
    """(N, C, H, W) -> cols of shape (C*kh*kw, N*OH*OW); see the module docstring.

    ``out``, if given, is a buffer of at least C*kh*kw*N*OH*OW entries of x's
    dtype that receives cols (a layer reuses one buffer from step to step).
    """
    xp = backend.array_module(x)
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    x_pad = pad_hw(x, padding)
    shape = (c, kh, kw, n, oh, ow)
    if out is None:
        cols = xp.empty(shape, dtype=x.dtype)
    else:
        cols = out.reshape(-1)[:c * kh * kw * n * oh * ow].reshape(shape)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = window_view(x_pad, i, j, stride, oh, ow).transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * oh * ow)


def col2im(cols, x_shape, kh: int, kw: int, stride: int = 1, padding: int = 0):
    """Adjoint of :func:`im2col`: (C*kh*kw, N*OH*OW) -> (N, C, H, W).

    dx_pad[n, c, oh*s + i, ow*s + j] += cols[(c, i, j), (n, oh, ow)] for every
    offset (i, j); the padding border is then cut off.
    """
    xp = backend.array_module(cols)
    n, c, h, w = x_shape
    oh, ow = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    cols = cols.reshape(c, kh, kw, n, oh, ow)
    dx_pad = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            window_view(dx_pad, i, j, stride, oh, ow)[...] += cols[:, i, j].transpose(1, 0, 2, 3)
    return dx_pad[:, :, padding:padding + h, padding:padding + w]


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
# wraps around into the next row. They are computed and cropped away (lenet's first
# layer: 28 x 32 outputs for 28 x 28 windows); in backward their dY is 0, so they
# add nothing to dW or dx. The last row's extra columns would read past the image:
# their cols are set to 0 instead.

def im2col_flat(x_pad, kh: int, kw: int, out=None, tails_are_zero: bool = False):
    """Stride-1 im2col of an already padded, C-contiguous (N, C, Hp, Wp) array.

    Returns one cols matrix per image, shape (N, C*kh*kw, OH*Wp)::

        cols[n, (c, i, j), q] = x_pad.reshape(N, C, Hp*Wp)[n, c, q + i*Wp + j]

    for q < L = (OH-1)*Wp + OW, and 0 for the last row's extra columns q >= L.
    The largest index read is L-1 + (kh-1)*Wp + kw-1 = Hp*Wp - 1: every read
    stays inside its own image. ``tails_are_zero``: ``out`` already holds 0 in
    those last columns (a buffer kept for this), so they are not written again.
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
    if not tails_are_zero:
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
# A layer with few filters (lenet's first: 6) makes W @ cols a product with very
# few rows, which BLAS runs at a fraction of its speed. Two neighbouring outputs
# q = 2*q2 and q = 2*q2 + 1 of the flat grid read windows that overlap in all but one
# column: together they read the kh x (kw+1) patch that starts at pixel 2*q2. So
# one column of kh*(kw+1) pixels per channel serves both, and the weights come twice,
# as W' = [W with a zero column after it; W with a zero column before it] (2*OC rows):
#
#     out[(oc, p), q2] = sum over (c, i, j') of W'[(oc, p), (c, i, j')] * x_pad[c, 2*q2 + i*Wp + j']
#                      = out[oc, 2*q2 + p]        with W'[(oc, p), (c, i, j')] = W[oc, c, i, j' - p]
#
# Half as many columns, each 1 + 1/kw times as tall, and twice the rows: for lenet's
# first layer 12 x 90 times 90 x 448 instead of 6 x 75 times 75 x 896, about 20% more
# multiply-adds that BLAS does in less time. With Wp even, output (oh, ow) is pair
# q2 = oh*Wp/2 + ow//2, position p = ow % 2: the products come out as (OC, 2, OH, Wp/2),
# the even columns of the grid, then the odd ones.

def im2col_flat_pairs(x_pad, kh: int, kw: int, out=None, tails_are_zero: bool = False):
    """Stride-1 im2col for outputs in pairs, of a C-contiguous (N, C, Hp, Wp) array with
    Wp even and kw odd. Returns (N, C*kh*(kw+1), OH*Wp/2)::

        cols[n, (c, i, j'), q2] = x_pad.reshape(N, C, Hp*Wp)[n, c, 2*q2 + i*Wp + j']

    for q2 < L/2 (L = (OH-1)*Wp + OW, even here, as in :func:`im2col_flat`), and 0
    for q2 >= L/2. The largest index read is L-2 + (kh-1)*Wp + kw = Hp*Wp - 1 (kw odd
    and Wp even make L even): every read stays inside its own image. The reads go
    through a copy of x_pad with its even and odd pixels apart (comment below).
    ``tails_are_zero``: ``out`` already holds 0 in the last columns.
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
    if not tails_are_zero:
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
