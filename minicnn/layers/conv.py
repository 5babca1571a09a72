"""2-D convolution by im2col and one matrix product.

Forward, with W = weight.reshape(OC, C*kh*kw) and cols = im2col(x)::

    Y = W @ cols + b            # (OC, N*OH*OW), then reshaped to (N, OC, OH, OW)

Backward, with dY = dy rearranged to (OC, N*OH*OW)::

    dW    = dY @ cols.T         # (OC, C*kh*kw): each weight meets every window it saw
    db    = dY.sum(axis=1)      # (OC,): the bias is added at every output position
    dcols = W.T @ dY            # (C*kh*kw, N*OH*OW)
    dx    = col2im(dcols)       # adjoint of im2col: sum back onto the input pixels

``chunk_images=None`` is the plain version: exactly these formulas on the
whole batch at once. The default fast version computes the same thing:

- in chunks of a few images, the same formulas on each chunk (dW and db are
  sums over images, so the chunks' parts add up). A chunk's cols, about
  CHUNK_BYTES, stays in the CPU cache between the copy and the matrix
  product; the whole batch's cols would not (75x the input for lenet's first
  layer: 60 MB at batch 256). A flat backward that computes dx also holds
  dcols, so its chunks count both (lenet's second layer at batch 256: 14
  chunks instead of 6).
- with stride 1 and few channels (lenet's layers), by
  :func:`~minicnn.im2col.im2col_flat`, one small matrix product per image
  (at most FLAT_PRODUCT_MACS multiply-adds: BLAS has fast kernels for small
  products; a layer with many channels makes big ones, which go faster as
  one product over the chunk, the plain formulas). Every kernel offset
  is one shifted slice of the flattened padded image, so cols is a single
  strided copy. The outputs then come on a grid of OH x Wp instead of
  OH x OW; the extra columns are cropped from Y, get dY = 0 in backward, and
  so change neither dW nor dx. col2im is then one sum over a strided view
  (:func:`~minicnn.im2col.col2im_flat_rows`) instead of kh*kw shifted adds.
- with few filters (at most PAIRS_MAX_OUT_CHANNELS: lenet's first layer has
  6), the flat version takes its outputs in pairs
  (:func:`~minicnn.im2col.im2col_flat_pairs`): W' holds each filter twice,
  shifted by one column, and one column of cols serves two neighbouring
  outputs. The product has twice the rows and half the columns, which BLAS
  runs faster: lenet's first layer's products took about 40% less time
  (measured, one thread, OpenBLAS's AVX2 kernels; its AVX-512 kernels take
  the same time for both, and cols is smaller either way). dW sums the
  gradients of each weight's two copies.
  There is no col2im for pairs, so a backward that computes dx stays unpaired.
- backward recomputes a chunk's cols from x instead of keeping all of them
  from forward: the copy is cheaper than reading them back from memory, and
  training keeps only x (as PyTorch does).
- the chunks are shared out among worker threads, one per core
  (:mod:`minicnn.parallel`). Each thread has its own scratch buffers (cols,
  the output grid), kept from call to call and shared by all conv layers;
  only buffers that must keep zeros in place belong to one layer (_buffer).

The tests check that the fast and plain versions agree.
"""

from __future__ import annotations

import math

from minicnn import backend, parallel, validation
from minicnn.im2col import (
    col2im,
    col2im_flat_rows,
    im2col,
    im2col_flat,
    im2col_flat_pairs,
    output_size,
    pad_hw,
    paired_weight,
    unpaired_weight_grad,
)
from minicnn.layers.base import Module
from minicnn.layers.init import kaiming_uniform_params
from minicnn.layers.pooling import window_cells

CHUNK_BYTES = 4 * 2**20        # target size of one chunk's cols, see the module docstring
FLAT_PRODUCT_MACS = 2**20      # largest product per image for the flat version (docstring)
PAIRS_MAX_OUT_CHANNELS = 8     # flat layers with at most this many filters take outputs in pairs
_SHARED_SCRATCH: dict = {}     # (what, worker) -> (buffer, layout) for every Conv2d, see _buffer


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    kh, kw = value
    return int(kh), int(kw)


class Conv2d(Module):
    """Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True).

    weight: (out_channels, in_channels, kh, kw), bias: (out_channels,), as in PyTorch.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        validation.check_sizes(self, in_channels=in_channels, out_channels=out_channels,
                               kernel_size=kernel_size, stride=stride, padding=padding)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        if stride < 1 or padding < 0:
            raise ValueError(f"Conv2d needs stride >= 1 and padding >= 0, got {stride}, {padding}")
        self.stride, self.padding = stride, padding
        kh, kw = self.kernel_size
        self.params = kaiming_uniform_params((out_channels, in_channels, kh, kw),
                                             fan_in=in_channels * kh * kw, bias=bias)
        self.chunk_images = "auto"
        self.cache = None
        self._scratch: dict = {}          # (what, worker) -> (buffer, layout), see _buffer

    def geometry(self, x):
        """(OH, OW) of the output, and Hp, Wp of the padded input."""
        kh, kw = self.kernel_size
        h, w = x.shape[2:]
        p, s = self.padding, self.stride
        return output_size(h, kh, s, p), output_size(w, kw, s, p), h + 2 * p, w + 2 * p

    def takes_flat_path(self, x) -> bool:
        """Whether the fast version uses im2col_flat: stride 1, and small products per image."""
        if self.stride != 1 or self.chunk_images is None:
            return False
        return self.out_channels * self._cols_per_image(x, flat=True) <= FLAT_PRODUCT_MACS

    def takes_pairs_path(self, x, dx: bool = False) -> bool:
        """Whether the flat version takes its outputs in pairs (im2col_flat_pairs): at most
        PAIRS_MAX_OUT_CHANNELS filters, Wp even and kw odd, and no dx to compute (there is
        no col2im for pairs; forward never computes dx). lenet's first layer: 6 filters."""
        _, kw = self.kernel_size
        return (not dx and self.out_channels <= PAIRS_MAX_OUT_CHANNELS and kw % 2 == 1
                and self.geometry(x)[3] % 2 == 0 and self.takes_flat_path(x))

    def _cols_per_image(self, x, flat: bool, pairs: bool = False) -> int:
        """Entries of cols for one image of x: C*kh*kw times OH*OW (flat: OH*Wp) windows;
        pairs: C*kh*(kw+1) times OH*Wp/2."""
        kh, kw = self.kernel_size
        oh, ow, _, wp = self.geometry(x)
        if pairs:
            return self.in_channels * kh * (kw + 1) * oh * wp // 2
        return self.in_channels * kh * kw * (oh * wp if flat else oh * ow)

    def _scratch_per_image(self, x, flat: bool, dx: bool = False) -> int:
        """Entries of scratch per image that a chunk works in: cols, or for the flat
        version the output grid if that is larger (more output than input channels x
        kh x kw). ``dx``: a flat backward that computes dx, which holds cols and the
        padded dcols rows (C*kh*kw x Hp*Wp, see flat_backward) at once: their sum.
        Outputs in pairs are sized as unpaired: their cols are 40% smaller for lenet's
        first layer, but 6 MB chunks, about 4 MB of its pairs cols, were no faster."""
        kh, kw = self.kernel_size
        oh, _, hp, wp = self.geometry(x)
        cols = self._cols_per_image(x, flat)
        if not flat:
            return cols
        if dx:
            return cols + self.in_channels * kh * kw * hp * wp
        return max(cols, self.out_channels * oh * wp)

    def _buffer(self, what: str, worker: int, shape, like, zeroed: bool = False):
        """Scratch space of ``shape`` = (images of a chunk, ...), kept between calls, one
        per worker thread: allocating it afresh for every chunk costs page faults that
        can take longer than the work itself. Returns an uninitialised view.

        Plain scratch space is shared by all Conv2d layers (_SHARED_SCRATCH): they run
        one after the other, and a chunk is done with it before the next begins.
        ``zeroed``: this layer's own buffer, zeros when made and kept only for this
        layout of an image, so the entries that its one user never writes stay 0 from
        call to call (the flat cols' last columns, a dY grid's extra columns): cheaper
        than writing those zeros on every call."""
        size, layout = math.prod(shape), tuple(shape[1:])
        store = self._scratch if zeroed else _SHARED_SCRATCH
        buffer, made_for = store.get((what, worker), (None, None))
        if (buffer is None or buffer.size < size or buffer.dtype != like.dtype
                or backend.on_cpu(buffer) != backend.on_cpu(like)
                or (zeroed and made_for != layout)):
            xp = backend.array_module(like)
            buffer = xp.zeros(size, like.dtype) if zeroed else xp.empty(size, like.dtype)
            store[(what, worker)] = buffer, layout
        return buffer[:size].reshape(shape)

    def _cols(self, x, part, worker: int, flat: bool, pairs: bool = False):
        """cols of the images ``part`` of x, in this worker's buffer: im2col (plain), or
        im2col_flat (or for pairs im2col_flat_pairs), whose last columns stay 0 in a
        buffer kept for that."""
        kh, kw = self.kernel_size
        count = self._cols_per_image(x, flat, pairs)
        what = "flat pairs cols" if pairs else "flat cols" if flat else "cols"
        out = self._buffer(what, worker, (part.stop - part.start, count), x, zeroed=flat)
        if flat:        # (B, C*kh*kw, OH*Wp), or for pairs (B, C*kh*(kw+1), OH*Wp/2)
            flat_im2col = im2col_flat_pairs if pairs else im2col_flat
            return flat_im2col(pad_hw(x[part], self.padding), kh, kw, out=out,
                               tails_are_zero=True)
        return im2col(x[part], kh, kw, self.stride, self.padding, out=out)   # (C*kh*kw, B*OH*OW)

    def chunks(self, x, flat: bool, dx: bool = False):
        """Slices of the batch whose scratch (_scratch_per_image; ``dx``: for a backward
        that computes dx) takes about CHUNK_BYTES each (one slice for the plain
        version), as many as a multiple of the worker threads so that they share evenly,
        and with several threads at least two each: a helper thread starts tens of
        microseconds after the caller, and with one chunk each the caller would wait."""
        n = x.shape[0]
        if self.chunk_images is None:
            size = n
        elif self.chunk_images == "auto":
            per_image = self._scratch_per_image(x, flat, dx)
            size = max(1, CHUNK_BYTES // (per_image * x.dtype.itemsize))
            count = -(-n // size)                                # ceil(n / size)
            threads = parallel.workers() if backend.on_cpu(x) else 1
            count = -(-count // threads) * threads
            if threads > 1:
                count = max(count, 2 * threads)
            size = -(-n // count)
        else:
            size = int(self.chunk_images)
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def check_input(self, x) -> None:
        """Raise ValueError unless x is (N, in_channels, H, W) with room for the kernel."""
        validation.check_input(self, x, ndim=4, expected=f"(N, {self.in_channels}, H, W)")
        _, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"Conv2d expected {self.in_channels} input channels, got {c} "
                             f"(input shape {tuple(x.shape)})")
        oh, ow, _, _ = self.geometry(x)
        if oh < 1 or ow < 1:
            kh, kw = self.kernel_size
            raise ValueError(f"Conv2d kernel {kh}x{kw} does not fit input {h}x{w} "
                             f"with padding {self.padding}")

    def forward(self, x):
        self.check_input(x)
        xp = backend.array_module(x)
        x = xp.ascontiguousarray(x)       # im2col_flat reads it by offsets (a flipped view would not do)
        oh, ow, _, _ = self.geometry(x)
        y = xp.empty((x.shape[0], self.out_channels, oh, ow), dtype=x.dtype)
        flat = self.takes_flat_path(x)
        chunk_forward = self._forward_flat if flat else self._forward_im2col
        parallel.run_chunks(lambda part, worker: chunk_forward(x, y, part, worker),
                            self.chunks(x, flat), x)
        self.cache = x if self.training else None
        return y

    def backward(self, dy):
        x = self.cache
        if x is None:
            raise RuntimeError("Conv2d.backward needs a forward pass in training mode first")
        dx = backend.array_module(dy).empty_like(x) if self.needs_input_grad else None
        flat = self.takes_flat_path(x)
        chunk_backward = self._backward_flat if flat else self._backward_im2col
        self.store_grads(parallel.run_chunks(
            lambda part, worker: chunk_backward(x, dy, dx, part, worker),
            self.chunks(x, flat, dx=dx is not None), x))
        return dx

    def store_grads(self, parts) -> None:
        """grads from the chunks' [(dW, db), ...]: dW and db are sums over images."""
        d_weight = sum(d_weight for d_weight, _ in parts)
        self.grads["weight"] = d_weight.reshape(self.params["weight"].shape)
        if "bias" in self.params:
            self.grads["bias"] = sum(d_bias for _, d_bias in parts)

    def _add_bias(self, maps, out):
        """out = maps + bias (one pass, no temporary); maps is (N, OC, ...)."""
        if "bias" in self.params:
            bias = self.params["bias"].reshape((-1,) + (1,) * (maps.ndim - 2))
            backend.array_module(maps).add(maps, bias, out=out)
        else:
            out[...] = maps

    # One chunk of images, the plain formulas: cols (C*kh*kw, B*OH*OW) --------------

    def _forward_im2col(self, x, y, part, worker):
        oh, ow, _, _ = self.geometry(x)
        weight = self.params["weight"].reshape(self.out_channels, -1)          # (OC, C*kh*kw)
        cols = self._cols(x, part, worker, flat=False)
        y_mat = weight @ cols                                                   # (OC, B*OH*OW)
        maps = y_mat.reshape(self.out_channels, -1, oh, ow).transpose(1, 0, 2, 3)
        self._add_bias(maps, y[part])

    def _backward_im2col(self, x, dy, dx, part, worker):
        kh, kw = self.kernel_size
        weight = self.params["weight"].reshape(self.out_channels, -1)
        cols = self._cols(x, part, worker, flat=False)                         # recomputed
        dy_mat = dy[part].transpose(1, 0, 2, 3).reshape(self.out_channels, -1)  # (OC, B*OH*OW)
        if dx is not None:
            dx[part] = col2im(weight.T @ dy_mat, x[part].shape, kh, kw, self.stride, self.padding)
        d_weight = (cols @ dy_mat.T).T    # this chunk's dW = dY @ cols.T; BLAS is faster
        return d_weight, dy_mat.sum(axis=1)   # at this shape with the long axis inside

    # One chunk of images, stride 1: flat cols, one product per image ---------------
    #
    # cols is (B, C*kh*kw, OH*Wp), and the products are stacked over the images
    # (W @ cols, one matrix product per image in a single call). Per image, the
    # products are small enough for BLAS's fast small-matrix kernels, and the
    # outputs come out image by image, already in (N, OC, ...) order.

    def _forward_flat(self, x, y, part, worker):
        grid = self.flat_forward(x, part, worker)
        for grid_part, columns in self.grid_columns(grid, self.geometry(x)[1]):
            y[part][..., columns] = grid_part

    def _backward_flat(self, x, dy, dx, part, worker):
        pairs = self.takes_pairs_path(x, dx=dx is not None)
        dy_grid = self.flat_grid(x, part, worker, "dy grid", pairs)   # 0 in the extra columns
        for grid_part, columns in self.grid_columns(dy_grid, self.geometry(x)[1]):
            grid_part[...] = dy[part][..., columns]
        return self.flat_backward(x, dy_grid, dx, part, worker)

    # The parts of the flat version, also used by the fused pass of
    # minicnn.layers.fused, which works on the grid between forward and backward.

    def flat_grid(self, x, part, worker, what: str = "grid", pairs: bool = False):
        """This worker's scratch grid for the images ``part`` of x: (B, OC, OH, Wp), or
        for outputs in pairs (B, OC, 2, OH, Wp/2), the grid's even columns, then its odd
        ones. Valid until the worker's next call with the same ``what``. "grid" (the
        output of flat_forward) is uninitialised; any other name gives a grid that was
        zeros when made and that only that name's user writes: the cells it never
        writes (the extra columns, for dY) stay 0."""
        oh, _, _, wp = self.geometry(x)
        b, oc = part.stop - part.start, self.out_channels
        shape = (b, oc, 2, oh, wp // 2) if pairs else (b, oc, oh, wp)
        return self._buffer(what, worker, shape, x, zeroed=what != "grid")

    @staticmethod
    def grid_columns(grid, ow: int):
        """Where a grid's outputs go in the (B, OC, OH, OW) maps: [(view of the grid,
        slice of the maps' columns), ...]: one part, or for pairs the even and odd columns."""
        if grid.ndim == 4:
            return [(grid[..., :ow], slice(0, ow))]
        return [(grid[:, :, 0, :, :(ow + 1) // 2], slice(0, ow, 2)),
                (grid[:, :, 1, :, :ow // 2], slice(1, ow, 2))]

    @staticmethod
    def grid_cells(grid, oh: int, ow: int):
        """The four cells of the 2x2 windows of a grid's maps (pooling.window_cells) for
        an OH x OW pooled output, as views of the grid in either layout."""
        if grid.ndim == 4:
            return window_cells(grid, oh, ow)
        even, odd = grid[:, :, 0], grid[:, :, 1]          # the maps' columns 2k and 2k + 1
        return (even[..., 0:2 * oh:2, :ow], odd[..., 0:2 * oh:2, :ow],
                even[..., 1:2 * oh:2, :ow], odd[..., 1:2 * oh:2, :ow])

    def _product_weight(self, pairs: bool):
        """W as the left factor of the products: (OC, C*kh*kw), or W' for pairs."""
        weight = self.params["weight"]
        return paired_weight(weight) if pairs else weight.reshape(self.out_channels, -1)

    def flat_forward(self, x, part, worker):
        """W @ cols + b for the images ``part`` of x, on the OH x Wp grid (flat_grid), in
        pairs where takes_pairs_path says so."""
        pairs = self.takes_pairs_path(x)
        weight = self._product_weight(pairs)                # (OC or 2*OC, K)
        cols = self._cols(x, part, worker, flat=True, pairs=pairs)
        grid = self.flat_grid(x, part, worker, pairs=pairs)
        b = grid.shape[0]
        backend.array_module(x).matmul(weight, cols, out=grid.reshape(b, weight.shape[0], -1))
        self._add_bias(grid, grid)
        return grid

    def flat_backward(self, x, dy_grid, dx, part, worker):
        """Backward for the images ``part`` from dY on the grid, (B, OC, OH, Wp) with 0 in
        the extra columns, or in pairs (flat_grid; then dx must be None): writes dx[part]
        (if dx is not None), returns this chunk's (dW, db)."""
        kh, kw = self.kernel_size
        h, w, p = x.shape[2], x.shape[3], self.padding
        _, _, hp, wp = self.geometry(x)
        b = part.stop - part.start
        pairs = dy_grid.ndim == 5
        if pairs and dx is not None:
            raise ValueError("outputs in pairs have no dx: use the (B, OC, OH, Wp) grid")
        cols = self._cols(x, part, worker, flat=True, pairs=pairs)              # recomputed
        xp = backend.array_module(dy_grid)
        db = xp.einsum("bol->o", dy_grid.reshape(b, self.out_channels, -1))   # sum over
        # images and grid cells; einsum's loop runs 2x faster here than sum(axis=(0, 2))
        dy_rows = self.out_channels * (2 if pairs else 1)
        dy_grid = dy_grid.reshape(b, dy_rows, -1)                  # (B, OC or 2*OC, grid cells)
        if dx is not None:      # dcols = W.T @ dY, in rows padded with zeros for col2im_flat_rows
            weight = self._product_weight(pairs=False)
            rows = self._buffer("dcols", worker, (b, weight.shape[1], hp * wp), dy_grid,
                                zeroed=True)                           # only [..., :OH*Wp] written
            xp.matmul(weight.T, dy_grid, out=rows[..., :dy_grid.shape[2]])
            dx_pad = col2im_flat_rows(rows, (b, self.in_channels, hp, wp), kh, kw)
            dx[part] = dx_pad[:, :, p:p + h, p:p + w]
        # dW = sum over images of dY_n @ cols_n.T. Unpaired it is computed as
        # (cols_n @ dY_n.T).T: BLAS is faster at those shapes with the long axis inside;
        # the pairs' 2*OC rows are faster as written (both measured, one thread)
        if pairs:
            d_paired = (dy_grid @ cols.transpose(0, 2, 1)).sum(axis=0)
            return unpaired_weight_grad(d_paired, self.params["weight"].shape), db
        return (cols @ dy_grid.transpose(0, 2, 1)).sum(axis=0).T, db

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params}")
