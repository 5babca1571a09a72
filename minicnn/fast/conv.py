"""The fast kernel of Conv2d: the same formulas as minicnn/layers/conv.py, computed
in chunks of images, on worker threads, in scratch buffers kept between calls.

It computes what the reference computes (Y = W @ cols + b; dW = dY @ cols.T,
db = sum dY, dx = col2im(W.T @ dY)), with these differences in how:

- Chunks: the batch is cut into chunks of a few images whose cols take about
  CHUNK_BYTES, so a chunk's cols stay in the CPU cache between the copy and
  the matrix product (the whole batch's cols are tens of times the input). dW
  and db are sums over images, so the chunks' parts add up. A backward that
  computes dx also holds dcols, so its chunks count both. Training on a thread
  that works alone (each process of minicnn.fast.replicas) takes smaller
  chunks, ONE_THREAD_CHUNK_BYTES (see chunks).
- Backward recomputes a chunk's cols from x instead of keeping them from
  forward: training keeps only x, as PyTorch does.
- Flat cols (stride 1, small products per image, at most FLAT_PRODUCT_MACS
  multiply-adds, or at most FLAT_MAX_OUT_CHANNELS filters):
  :func:`~minicnn.fast.im2col.im2col_flat`, one strided copy, and one small
  product per image, which BLAS runs with its fast small-matrix kernels. The
  outputs come on a grid of OH x Wp instead of OH x OW; the extra columns are
  cropped from Y and get dY = 0 in backward, so they change neither dW nor dx.
  col2im is one sum over a strided view
  (:func:`~minicnn.fast.im2col.col2im_flat_rows`).
- Outputs in pairs (flat layers with at most PAIRS_MAX_OUT_CHANNELS filters, and
  no dx to compute): W' holds each filter twice, shifted by one column, and one
  column of cols serves two neighbouring outputs
  (:func:`~minicnn.fast.im2col.im2col_flat_pairs`): twice the rows and half the
  columns, a shape BLAS runs faster. dW sums the gradients of each weight's two
  copies.
- Threads: the chunks are shared out among worker threads, one per core
  (:mod:`minicnn.fast.parallel`). Each thread has its own scratch buffers (cols,
  the output grid), kept from call to call and shared by all conv layers; only
  buffers that must keep zeros in place belong to one layer (_buffer).

The fused conv-ReLU-pool pass (minicnn.fast.fused) uses flat_forward,
flat_backward and the grid helpers. tests/test_fast_kernels.py compares all of
it with the reference.
"""

from __future__ import annotations

import math

from minicnn import backend
from minicnn.fast import parallel
from minicnn.fast.im2col import (
    col2im_flat_rows,
    im2col_flat,
    im2col_flat_pairs,
    paired_weight,
    unpaired_weight_grad,
)
from minicnn.fast.pooling import window_cells
from minicnn.im2col import col2im, im2col, pad_hw
from minicnn.layers.conv import Conv2d

CHUNK_BYTES = 4 * 2**20        # target size of one chunk's scratch, see the module docstring
ONE_THREAD_CHUNK_BYTES = 2 * 2**20   # ... training on one thread alone, see chunks()
FLAT_PRODUCT_MACS = 2**20      # largest product per image for flat cols (docstring)
FLAT_MAX_OUT_CHANNELS = 64     # ... or at most this many filters, a product of any size
PAIRS_MAX_OUT_CHANNELS = 8     # flat layers with at most this many filters take outputs in pairs
CHANNELS_LAST_RATIO = 16      # channels-last where in_channels >= this times OW, see path()
_SHARED_SCRATCH: dict = {}     # (what, worker) -> (buffer, layout) for every FastConv2d, see _buffer


class FastConv2d(Conv2d):
    """Conv2d computed in chunks over threads; see the module docstring.

    ``chunk_images``: "auto" (chunks of about CHUNK_BYTES) or a number of images.
    """

    reference_layer = Conv2d
    transient = {**Conv2d.transient, "_scratch": dict}
    chunk_images = "auto"
    relu_output = False     # ReLU on the output as each chunk is written (folded inference)

    @property
    def _scratch(self) -> dict:
        """This layer's own scratch buffers: (what, worker) -> (buffer, layout)."""
        return self.__dict__.setdefault("_scratch", {})

    def takes_flat_path(self, x) -> bool:
        """Whether im2col_flat is used: stride 1, and small products per image or few
        filters (at most FLAT_MAX_OUT_CHANNELS: there its one strided copy and its col2im
        beat the reference's short rows, backward most, docs/performance.md)."""
        if self.stride != 1:
            return False
        return (self.out_channels <= FLAT_MAX_OUT_CHANNELS
                or self.out_channels * self._cols_per_image(x, flat=True) <= FLAT_PRODUCT_MACS)

    def takes_pairs_path(self, x, dx: bool = False) -> bool:
        """Whether the flat version takes its outputs in pairs (im2col_flat_pairs): at most
        PAIRS_MAX_OUT_CHANNELS filters, Wp even and kw odd, and no dx to compute (there is
        no col2im for pairs; forward never computes dx)."""
        _, kw = self.kernel_size
        return (not dx and self.out_channels <= PAIRS_MAX_OUT_CHANNELS and kw % 2 == 1
                and self.geometry(x)[3] % 2 == 0 and self.takes_flat_path(x))

    def path(self, x) -> str:
        """How this input's chunks are computed: "flat" (stride 1, small products per
        image: im2col_flat), else "channels-last" for many channels on a narrow output
        (in_channels >= CHANNELS_LAST_RATIO * OW: the reference's cols would be copied
        in runs of a few numbers, the (N, H, W, C) layout copies runs of C; the
        transposes into and out of it cost more than that saves on wider outputs,
        docs/performance.md), else "im2col" (the reference's cols per chunk)."""
        if self.takes_flat_path(x):
            return "flat"
        wide = self.in_channels >= CHANNELS_LAST_RATIO * self.geometry(x)[1]
        return "channels-last" if wide else "im2col"

    def _cols_per_image(self, x, flat: bool, pairs: bool = False) -> int:
        """Entries of cols for one image of x: C*kh*kw times OH*OW (flat: OH*Wp) windows;
        pairs: C*kh*(kw+1) times OH*Wp/2."""
        kh, kw = self.kernel_size
        oh, ow, _, wp = self.geometry(x)
        if pairs:
            return self.in_channels * kh * (kw + 1) * oh * wp // 2
        return self.in_channels * kh * kw * (oh * wp if flat else oh * ow)

    def _scratch_per_image(self, x, path: str, dx: bool = False) -> int:
        """Entries of scratch per image that a chunk works in: cols; for the flat
        version the output grid if that is larger (more output than input channels x
        kh x kw); channels-last adds the padded input and the output (and with ``dx``
        the padded dY and dx, dY's cols sharing cols' buffer; or for col2im dcols and
        the padded dx). ``dx``: a flat backward that computes dx, which holds
        cols and the padded dcols rows (C*kh*kw x Hp*Wp, see flat_backward) at once:
        their sum. Outputs in pairs are sized as unpaired (docs/performance.md: larger
        chunks for their smaller cols were no faster)."""
        kh, kw = self.kernel_size
        oh, ow, hp, wp = self.geometry(x)
        flat = path == "flat"
        cols = self._cols_per_image(x, flat)
        if path == "channels-last":
            padded, dy_t = hp * wp * self.in_channels, oh * ow * self.out_channels
            if not dx:
                return cols + padded + dy_t
            if not self._dx_as_convolution():
                return 2 * (cols + padded) + dy_t
            h, w = x.shape[2], x.shape[3]                     # dcols share cols' buffer
            dy_padded = (h + kh - 1) * (w + kw - 1) * self.out_channels
            d_cols = h * w * kh * kw * self.out_channels
            return max(cols, d_cols) + padded + dy_t + dy_padded + h * w * self.in_channels
        if not flat:
            return cols
        if dx:
            return cols + self.in_channels * kh * kw * hp * wp
        return max(cols, self.out_channels * oh * wp)

    def _buffer(self, what: str, worker: int, shape, like, zeroed: bool = False):
        """Scratch space of ``shape`` = (images of a chunk, ...), kept between calls, one
        per worker thread: allocating it afresh for every chunk costs page faults that
        can take longer than the work itself. Returns an uninitialised view.

        Plain scratch space is shared by all FastConv2d layers (_SHARED_SCRATCH): they run
        one after the other, and a chunk is done with it before the next begins.
        ``zeroed``: this layer's own buffer, zeros when made and kept only for this
        layout of an image, so the entries that its one user never writes stay 0 from
        call to call (a dY grid's extra columns): cheaper than writing those zeros on
        every call, for buffers that are small."""
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
        """cols of the images ``part`` of x, in this worker's buffer (shared by all layers:
        cols are the largest scratch, and one per layer would add up): im2col (plain),
        or im2col_flat (or for pairs im2col_flat_pairs), which also writes the zeros of
        the last columns."""
        kh, kw = self.kernel_size
        count = self._cols_per_image(x, flat, pairs)
        what = "flat pairs cols" if pairs else "flat cols" if flat else "cols"
        out = self._buffer(what, worker, (part.stop - part.start, count), x)
        if flat:        # (B, C*kh*kw, OH*Wp), or for pairs (B, C*kh*(kw+1), OH*Wp/2)
            flat_im2col = im2col_flat_pairs if pairs else im2col_flat
            return flat_im2col(pad_hw(x[part], self.padding), kh, kw, out=out)
        return im2col(x[part], kh, kw, self.stride, self.padding, out=out)   # (C*kh*kw, B*OH*OW)

    def chunks(self, x, path: str, dx: bool = False):
        """Slices of the batch whose scratch (_scratch_per_image; ``dx``: for a backward
        that computes dx) takes about CHUNK_BYTES each (``chunk_images``: that many
        images each, None: one chunk), as many as a multiple of the worker threads so
        that they share evenly, and with several threads at least two each: a helper
        thread starts tens of microseconds after the caller, and with one chunk each the
        caller would wait.

        Training where this process runs one thread at a time (parallel.threads_at_work):
        chunks of ONE_THREAD_CHUNK_BYTES, nearer the size of a core's own cache. Several
        threads in one process take the larger ones: each chunk is dozens of NumPy calls,
        and every call takes the GIL back, so there fewer calls win; so does inference
        (docs/performance.md)."""
        n = x.shape[0]
        if self.chunk_images is None:
            size = n
        elif self.chunk_images == "auto":
            per_image = self._scratch_per_image(x, path, dx)
            alone = self.training and backend.on_cpu(x) and parallel.threads_at_work() == 1
            target = ONE_THREAD_CHUNK_BYTES if alone else CHUNK_BYTES
            size = max(1, target // (per_image * x.dtype.itemsize))
            count = -(-n // size)                                # ceil(n / size)
            threads = parallel.workers() if backend.on_cpu(x) else 1
            count = -(-count // threads) * threads
            if threads > 1:
                count = max(count, 2 * threads)
            size = -(-n // count)
        else:
            size = int(self.chunk_images)
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def forward(self, x):
        self.check_input(x)
        xp = backend.array_module(x)
        x = xp.ascontiguousarray(x)       # im2col_flat reads it by offsets (a flipped view would not do)
        oh, ow, _, _ = self.geometry(x)
        y = xp.empty((x.shape[0], self.out_channels, oh, ow), dtype=x.dtype)
        path = self.path(x)
        chunk_forward = {"flat": self._forward_flat, "im2col": self._forward_im2col,
                         "channels-last": self._forward_channels_last}[path]
        weight = self._channels_last_weight() if path == "channels-last" else None
        parallel.run_chunks(lambda part, worker: chunk_forward(x, y, part, worker, weight),
                            self.chunks(x, path), x)
        self.cache = x if self.training else None
        return y

    def backward(self, dy):
        x = self.cache
        if x is None:
            raise RuntimeError("Conv2d.backward needs a forward pass in training mode first")
        dx = backend.array_module(dy).empty_like(x) if self.needs_input_grad else None
        path = self.path(x)
        chunk_backward = {"flat": self._backward_flat, "im2col": self._backward_im2col,
                          "channels-last": self._backward_channels_last}[path]
        weight = None                  # channels last: dx's factor, W_rot or (for col2im) W^T
        if path == "channels-last" and dx is not None:
            weight = (self._rotated_weight() if self._dx_as_convolution()
                      else self._channels_last_weight())
        self.store_grads(parallel.run_chunks(
            lambda part, worker: chunk_backward(x, dy, dx, part, worker, weight),
            self.chunks(x, path, dx=dx is not None), x), channels_last=path == "channels-last")
        return dx

    def store_grads(self, parts, channels_last: bool = False) -> None:
        """grads from the chunks' [(dW, db), ...]: dW and db are sums over images (db is
        None without a bias). ``channels_last``: the chunks' dW are dW^T with rows in
        cols' (i, j, c) order, added up first and put in W's order once."""
        d_weight = sum(d_weight for d_weight, _ in parts)
        if channels_last:
            kh, kw = self.kernel_size
            d_weight = d_weight.reshape(kh, kw, self.in_channels, -1).transpose(3, 2, 0, 1)
        self.grads["weight"] = d_weight.reshape(self.params["weight"].shape)
        if "bias" in self.params:
            self.grads["bias"] = sum(d_bias for _, d_bias in parts)

    def _bias_grad(self, sum_dy):
        """db = sum_dy(), computed only if this layer has a bias (else None)."""
        return sum_dy() if "bias" in self.params else None

    def _add_bias_and_relu(self, out, channel_axis: int) -> None:
        """In place on a chunk's output, while it is in the cache, before it is copied
        into y: out += bias (the channels along ``channel_axis``), then with relu_output
        out = max(out, 0)."""
        xp = backend.array_module(out)
        if "bias" in self.params:
            shape = [1] * out.ndim
            shape[channel_axis] = -1
            out += self.params["bias"].reshape(shape)
        if self.relu_output:
            xp.maximum(out, 0, out=out)

    # One chunk of images, the plain formulas: cols (C*kh*kw, B*OH*OW) --------------

    def _forward_im2col(self, x, y, part, worker, _=None):
        oh, ow, _, _ = self.geometry(x)
        weight = self.params["weight"].reshape(self.out_channels, -1)          # (OC, C*kh*kw)
        cols = self._cols(x, part, worker, flat=False)
        y_mat = weight @ cols                                                   # (OC, B*OH*OW)
        self._add_bias_and_relu(y_mat, 0)
        y[part] = y_mat.reshape(self.out_channels, -1, oh, ow).transpose(1, 0, 2, 3)

    def _backward_im2col(self, x, dy, dx, part, worker, _=None):
        kh, kw = self.kernel_size
        weight = self.params["weight"].reshape(self.out_channels, -1)
        cols = self._cols(x, part, worker, flat=False)                         # recomputed
        dy_mat = dy[part].transpose(1, 0, 2, 3).reshape(self.out_channels, -1)  # (OC, B*OH*OW)
        if dx is not None:
            dx[part] = col2im(weight.T @ dy_mat, x[part].shape, kh, kw, self.stride, self.padding)
        d_weight = (cols @ dy_mat.T).T    # this chunk's dW = dY @ cols.T; BLAS is faster
        return d_weight, self._bias_grad(lambda: dy_mat.sum(axis=1))   # (long axis inside)

    # One chunk of images, channels last: cols (B*OH*OW, kh*kw*C) -------------------
    #
    # The same products, transposed: with x in the (B, H, W, C) layout each kernel
    # offset's slice is a block of whole channel vectors, so im2col copies runs of C
    # numbers instead of rows of OW. x and dy are put into that layout once per
    # chunk, and y and dx back into (N, C, H, W).
    #
    #     Y^T  = cols @ W^T               (B*OH*OW, OC)
    #     dW^T = cols.T @ dY^T            (kh*kw*C, OC)
    #
    # dx, at stride 1, is itself a convolution: each input pixel gathers dY from
    # the outputs whose windows covered it, through the kernel turned by 180
    # degrees. With dY padded by kh-1-p rows and kw-1-p columns (zeros):
    #
    #     dx^T = dcols @ W_rot            (B*H*W, C)
    #     dcols[b, h, w, i, j, :] = dY_padded[b, h + i, w + j, :]
    #     W_rot[(i, j, o), c] = W[o, c, kh-1-i, kw-1-j]
    #
    # so dx needs a copy and a product, not the scatter-add of col2im over kh*kw
    # offsets (dY's cols are OC/C times the size of col2im's dcols: with more
    # filters than input channels, and at other strides, col2im is kept:
    # dcols = dY^T @ W, each offset's share added back).

    def _channels_last_weight(self):
        """W^T with its rows in cols' (i, j, c) order: (kh*kw*C, OC)."""
        weight = self.params["weight"]                                    # (OC, C, kh, kw)
        return backend.array_module(weight).ascontiguousarray(
            weight.transpose(2, 3, 1, 0)).reshape(-1, self.out_channels)

    def _rotated_weight(self):
        """W_rot (kh*kw*OC, C): the kernel turned by 180 degrees, rows in (i, j, o) order."""
        weight = self.params["weight"][:, :, ::-1, ::-1]                 # (OC, C, kh, kw)
        return backend.array_module(weight).ascontiguousarray(
            weight.transpose(2, 3, 0, 1)).reshape(-1, self.in_channels)

    def _dx_as_convolution(self) -> bool:
        """Whether channels-last backward computes dx as a convolution of dY: stride 1,
        padding at most the kernel's size - 1, and no more filters than input channels
        (dY's cols are OC/C times the size of col2im's dcols), else by col2im."""
        kh, kw = self.kernel_size
        return (self.stride == 1 and self.padding <= min(kh, kw) - 1
                and self.out_channels <= self.in_channels)

    def _channels_last_cols(self, maps, part, worker, pad, what: str):
        """cols (B, OH', OW', kh, kw, C') of the (N, C', H', W') ``maps`` (images
        ``part``), padded by ``pad`` = (rows, columns), at this layer's stride, in
        this worker's scratch buffers ``what``."""
        kh, kw = self.kernel_size
        s = self.stride
        b, c, h, w = maps[part].shape
        ph, pw = pad
        oh, ow = (h + 2 * ph - kh) // s + 1, (w + 2 * pw - kw) // s + 1
        padded = self._buffer(what + " padded", worker, (b, h + 2 * ph, w + 2 * pw, c), maps,
                              zeroed=True)
        padded[:, ph:ph + h, pw:pw + w, :] = maps[part].transpose(0, 2, 3, 1)  # border stays 0
        cols = self._buffer("cols channels last", worker, (b, oh, ow, kh, kw, c), maps)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, :, i, j] = padded[:, i:i + s * oh:s, j:j + s * ow:s]
        return cols

    def _forward_channels_last(self, x, y, part, worker, weight):
        oh, ow, _, _ = self.geometry(x)
        p = self.padding
        cols = self._channels_last_cols(x, part, worker, (p, p), "x")
        b = cols.shape[0]
        y_t = self._buffer("y channels last", worker, (b, oh, ow, self.out_channels), x)
        backend.array_module(x).matmul(cols.reshape(b * oh * ow, -1), weight,
                                       out=y_t.reshape(b * oh * ow, -1))
        self._add_bias_and_relu(y_t, -1)
        y[part] = y_t.transpose(0, 3, 1, 2)

    def _backward_channels_last(self, x, dy, dx, part, worker, weight):
        xp = backend.array_module(dy)
        kh, kw = self.kernel_size
        oh, ow, hp, wp = self.geometry(x)
        p, s, oc = self.padding, self.stride, self.out_channels
        cols = self._channels_last_cols(x, part, worker, (p, p), "x")          # recomputed
        b, c = cols.shape[0], self.in_channels
        dy_t = self._buffer("dy channels last", worker, (b, oh, ow, oc), dy)
        dy_t[...] = dy[part].transpose(0, 2, 3, 1)
        dy_t = dy_t.reshape(-1, oc)                                           # (B*OH*OW, OC)
        d_weight_t = cols.reshape(b * oh * ow, -1).T @ dy_t      # (kh*kw*C, OC), see store_grads
        if dx is not None and self._dx_as_convolution():      # cols' buffer is free again
            h, w = x.shape[2], x.shape[3]
            d_cols = self._channels_last_cols(dy, part, worker, (kh - 1 - p, kw - 1 - p), "dy")
            dx_t = self._buffer("dx channels last", worker, (b, h, w, c), dy)
            xp.matmul(d_cols.reshape(b * h * w, -1), weight, out=dx_t.reshape(b * h * w, c))
            dx[part] = dx_t.transpose(0, 3, 1, 2)
        elif dx is not None:
            d_cols = self._buffer("dcols channels last", worker, (b, oh, ow, kh, kw, c), dy)
            xp.matmul(dy_t, weight.T, out=d_cols.reshape(b * oh * ow, -1))
            dx_pad = self._buffer("dx channels last", worker, (b, hp, wp, c), dy)
            dx_pad.fill(0)
            for i in range(kh):                       # col2im: each offset's share added back
                for j in range(kw):
                    dx_pad[:, i:i + s * oh:s, j:j + s * ow:s] += d_cols[:, :, :, i, j]
            dx[part] = dx_pad[:, p:p + x.shape[2], p:p + x.shape[3]].transpose(0, 3, 1, 2)
        return d_weight_t, self._bias_grad(lambda: dy_t.sum(axis=0))

    # One chunk of images, stride 1: flat cols, one product per image ---------------
    #
    # cols is (B, C*kh*kw, OH*Wp), and the products are stacked over the images
    # (W @ cols, one matrix product per image in a single call). Per image, the
    # products are small enough for BLAS's fast small-matrix kernels, and the
    # outputs come out image by image, already in (N, OC, ...) order.

    def _forward_flat(self, x, y, part, worker, _=None):
        grid = self.flat_forward(x, part, worker)
        for grid_part, columns in self.grid_columns(grid, self.geometry(x)[1]):
            if self.relu_output:
                backend.array_module(x).maximum(grid_part, 0, out=y[part][..., columns])
            else:
                y[part][..., columns] = grid_part

    def _backward_flat(self, x, dy, dx, part, worker, _=None):
        pairs = self.takes_pairs_path(x, dx=dx is not None)
        dy_grid = self.flat_grid(x, part, worker, "dy grid", pairs)   # 0 in the extra columns
        for grid_part, columns in self.grid_columns(dy_grid, self.geometry(x)[1]):
            grid_part[...] = dy[part][..., columns]
        return self.flat_backward(x, dy_grid, dx, part, worker)

    # The parts of the flat version, also used by the fused pass of
    # minicnn.fast.fused, which works on the grid between forward and backward.

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
        if "bias" in self.params:
            grid += self.params["bias"].reshape((-1,) + (1,) * (grid.ndim - 2))
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
        db = self._bias_grad(lambda: xp.einsum("bol->o", dy_grid.reshape(b, self.out_channels, -1)))
        # db sums over images and grid cells (einsum's loop is faster than sum(axis=(0, 2)))
        dy_rows = self.out_channels * (2 if pairs else 1)
        dy_grid = dy_grid.reshape(b, dy_rows, -1)                  # (B, OC or 2*OC, grid cells)
        if dx is not None:      # dcols = W.T @ dY, in rows padded with zeros for col2im_flat_rows
            weight = self._product_weight(pairs=False)
            rows = self._buffer("dcols", worker, (b, weight.shape[1], hp * wp), dy_grid)
            xp.matmul(weight.T, dy_grid, out=rows[..., :dy_grid.shape[2]])
            rows[..., dy_grid.shape[2]:] = 0
            dx_pad = col2im_flat_rows(rows, (b, self.in_channels, hp, wp), kh, kw)
            dx[part] = dx_pad[:, :, p:p + h, p:p + w]
        # dW = sum over images of dY_n @ cols_n.T. Unpaired it is computed as
        # (cols_n @ dY_n.T).T: BLAS is faster at those shapes with the long axis inside;
        # the pairs' 2*OC rows are faster as written (docs/performance.md)
        if pairs:
            d_paired = (dy_grid @ cols.transpose(0, 2, 1)).sum(axis=0)
            return unpaired_weight_grad(d_paired, self.params["weight"].shape), db
        return (cols @ dy_grid.transpose(0, 2, 1)).sum(axis=0).T, db
