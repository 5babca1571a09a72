"""2-D convolution by im2col and one matrix product.

Forward, with W = weight.reshape(OC, C*kh*kw) and cols = im2col(x)::

    Y = W @ cols + b            # (OC, N*OH*OW), then reshaped to (N, OC, OH, OW)

Backward, with dY = dy rearranged to (OC, N*OH*OW)::

    dW    = dY @ cols.T         # (OC, C*kh*kw): each weight meets every window it saw
    db    = dY.sum(axis=1)      # (OC,): the bias is added at every output position
    dcols = W.T @ dY            # (C*kh*kw, N*OH*OW)
    dx    = col2im(dcols)       # adjoint of im2col: sum back onto the input pixels

Both passes run over the batch in chunks of images, the same formulas on each
chunk (dW and db are sums over images, so the chunks' parts are added up):

- cols has C*kh*kw times more entries than the output map (75x for the
  first layer of lenet: 60 MB at batch 256). A chunk's cols, a few MB, stays
  in the CPU cache between the copy and the matrix product.
- backward recomputes a chunk's cols from x instead of keeping all of them
  from forward: copying cols out of x again is cheaper than reading 60 MB
  back from memory, and training keeps only x (as PyTorch does).
- the chunks are shared out among worker threads, one per core
  (:mod:`minicnn.parallel`); each thread has its own cols buffer.

``chunk_images=None`` is the plain version, the whole batch as one chunk; the
tests check that chunked and plain agree.
"""

from __future__ import annotations

from minicnn import backend, parallel
from minicnn.im2col import col2im, im2col, output_size
from minicnn.layers.base import Module
from minicnn.layers.init import kaiming_uniform_params

CHUNK_BYTES = 4 * 2**20   # target size of one chunk's cols, see the module docstring


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
        self._cols_buffers: dict = {}     # worker thread -> its cols buffer, see _buffer

    def _cols_per_image(self, x) -> int:
        """Entries of cols for one image of x: C*kh*kw*OH*OW."""
        kh, kw = self.kernel_size
        h, w = x.shape[2:]
        return (self.in_channels * kh * kw * output_size(h, kh, self.stride, self.padding)
                * output_size(w, kw, self.stride, self.padding))

    def _buffer(self, x, part, worker: int):
        """A cols buffer for one chunk, kept between calls (one per worker thread):
        allocating a few MB afresh for every chunk costs page faults that took
        longer than the copy itself."""
        size = self._cols_per_image(x) * (part.stop - part.start)
        buffer = self._cols_buffers.get(worker)
        if buffer is None or buffer.size < size or buffer.dtype != x.dtype \
                or backend.on_cpu(buffer) != backend.on_cpu(x):
            buffer = self._cols_buffers[worker] = backend.array_module(x).empty(size, x.dtype)
        return buffer

    def _chunks(self, x):
        """Slices of the batch whose cols take about CHUNK_BYTES each (one for the plain version)."""
        n = x.shape[0]
        if self.chunk_images is None:
            size = n
        elif self.chunk_images == "auto":
            size = max(1, CHUNK_BYTES // (self._cols_per_image(x) * x.dtype.itemsize))
        else:
            size = int(self.chunk_images)
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def forward(self, x):
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"Conv2d expected {self.in_channels} input channels, got {c} "
                             f"(input shape {tuple(x.shape)})")
        kh, kw = self.kernel_size
        oh = output_size(h, kh, self.stride, self.padding)
        ow = output_size(w, kw, self.stride, self.padding)
        if oh < 1 or ow < 1:
            raise ValueError(f"Conv2d kernel {kh}x{kw} does not fit input {h}x{w} "
                             f"with padding {self.padding}")
        xp = backend.array_module(x)
        weight = self.params["weight"].reshape(self.out_channels, -1)     # (OC, C*kh*kw)
        y = xp.empty((n, self.out_channels, oh, ow), dtype=x.dtype)

        def forward_chunk(part, worker):
            cols = im2col(x[part], kh, kw, self.stride, self.padding,
                          out=self._buffer(x, part, worker))           # (C*kh*kw, B*OH*OW)
            y_part = weight @ cols                                        # (OC, B*OH*OW)
            y[part] = y_part.reshape(self.out_channels, -1, oh, ow).transpose(1, 0, 2, 3)

        parallel.run_chunks(forward_chunk, self._chunks(x), x)
        if "bias" in self.params:
            y += self.params["bias"][:, None, None]
        self.cache = x if self.training else None
        return y

    def backward(self, dy):
        x = self.cache
        if x is None:
            raise RuntimeError("Conv2d.backward needs a forward pass in training mode first")
        xp = backend.array_module(dy)
        kh, kw = self.kernel_size
        weight = self.params["weight"].reshape(self.out_channels, -1)     # (OC, C*kh*kw)
        dx = xp.empty_like(x) if self.needs_input_grad else None

        def backward_chunk(part, worker):
            cols = im2col(x[part], kh, kw, self.stride, self.padding,
                          out=self._buffer(x, part, worker))           # recomputed, see above
            dy_mat = dy[part].transpose(1, 0, 2, 3).reshape(self.out_channels, -1)
            if dx is not None:
                dcols = weight.T @ dy_mat                                  # (C*kh*kw, B*OH*OW)
                dx[part] = col2im(dcols, x[part].shape, kh, kw, self.stride, self.padding)
            return (cols @ dy_mat.T).T        # this chunk's dW = dY @ cols.T; BLAS is faster
                                              # at this shape with the long axis inside

        d_weight = sum(parallel.run_chunks(backward_chunk, self._chunks(x), x))
        self.grads["weight"] = d_weight.reshape(self.params["weight"].shape)
        if "bias" in self.params:
            self.grads["bias"] = dy.sum(axis=(0, 2, 3))
        return dx

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params}")
