"""A strict stand-in for CuPy, backed by NumPy, for the test suite only (never shipped).

``MINICNN_FAKE_CUPY=tests.fake_cupy python -m pytest`` makes minicnn.backend
import this module instead of ``cupy`` (see backend._import_cupy): every test
parametrized over the backends then runs its CuPy case on a machine without a
GPU. The point is not to compute on a GPU but to fail wherever CuPy would,
so host/device mix-ups show up on every CI run:

- Its ``ndarray`` is not a NumPy array and refuses to become one implicitly:
  ``numpy.asarray(a)`` (``__array__``) raises TypeError, as in CuPy; the way to
  the host is ``a.get()`` or ``asnumpy(a)``, and both copy.
- Ufuncs and operators take only stand-in arrays and scalars: mixing in a
  NumPy array (``a + numpy_array``, ``numpy_array * a``) or a list raises
  TypeError, as CuPy's do. Other functions refuse NumPy arrays too.
  ``asarray``/``array`` copy host data in (a device array never aliases host
  memory); NumPy arrays and lists used as indices are accepted, as CuPy does.
- ``a[...] = numpy_array`` raises ValueError, as CuPy's slice assignment does
  (here through array indices too, where CuPy would copy it over: stricter).
- Integer-array indices that are out of bounds wrap around instead of raising
  (CuPy's documented behaviour); assigning through integer-array indices that
  hit one element twice raises here (CuPy leaves the value undefined).
- Reductions, ``a[i, j]`` and iteration give 0-d arrays, never NumPy scalars
  (``a[i, j]`` is a view, as in CuPy); ``float()``, ``int()``, ``bool()``,
  ``.item()`` and formatting convert, but there is no ``__index__``.
- ``random.default_rng`` gives a Generator with a stream of its own (not
  NumPy's) and only CuPy's methods: random, integers, uniform,
  standard_normal, standard_exponential, exponential (no permutation, choice,
  shuffle, normal).
- ``lib.stride_tricks.as_strided(x, shape, strides)`` has no ``writeable``.
- ``ndarray.flags`` has only c_contiguous, f_contiguous and owndata.
- ``cuda.runtime.getDeviceCount()`` is 1; ``cuda.Device().synchronize()``
  returns at once (it counts calls in ``cuda.synchronize_calls``).

What it cannot catch (it runs NumPy's kernels, synchronously, in host
memory): speed and memory use on a GPU, out-of-memory errors, CUDA and
compilation errors, asynchrony (a timer read without synchronize, a host
array reused before its copy finished), dtype promotion or rounding where
CuPy's kernels differ from NumPy's, float-to-int casts of NaN or negative
values, and where a function below takes arguments or gives results that
CuPy's does not: each is NumPy's underneath, with stand-in arrays in and out.
A name this module does not define is an AttributeError here, as it would be
on CuPy if CuPy lacks it too.
"""

from __future__ import annotations

import builtins as _builtins
import sys as _sys
import types as _types

import numpy as _np

__version__ = "stand-in"

# Types that CuPy accepts as scalars in ufuncs and operators.
_SCALARS = (bool, int, float, complex, _np.generic)

# The NumPy types are CuPy's (cupy.float32 is numpy.float32).
for _name in ("bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
              "uint64", "float16", "float32", "float64", "complex64", "complex128", "intp",
              "dtype", "iinfo", "finfo", "inf", "nan", "pi", "e", "newaxis", "integer",
              "floating", "number", "generic", "result_type", "can_cast", "isscalar"):
    globals()[_name] = getattr(_np, _name)


class ndarray:
    """A device array of the stand-in: NumPy memory that refuses to be used as NumPy's."""

    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("the CuPy stand-in makes arrays from a shape only")
        self._a = _np.empty(shape, dtype=dtype, order=order)
        _check_dtype(self._a.dtype)

    @classmethod
    def _of(cls, host: _np.ndarray) -> ndarray:
        array = object.__new__(cls)
        array._a = host
        return array

    # --- what CuPy refuses, and the explicit ways to the host -------------------------

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        """A copy in host memory (a NumPy array)."""
        if out is not None:
            if not isinstance(out, _np.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
            if out.dtype != self.dtype or out.shape != self.shape:
                raise TypeError(f"{out.dtype} {out.shape} array cannot be obtained from "
                                f"{self.dtype} {self.shape} array")
            out[...] = self._a
            return out
        return _np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        """Copy the host array ``arr`` into this array."""
        if not isinstance(arr, _np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, not {type(arr)}")
        if arr.dtype != self.dtype or arr.shape != self.shape:
            raise ValueError(f"{arr.dtype} {arr.shape} array cannot be set to "
                             f"{self.dtype} {self.shape} array")
        self._a[...] = arr

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()

    def tobytes(self, order="C"):
        return self._a.tobytes(order)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __complex__(self):
        return complex(self._a)

    def __bool__(self):
        return bool(self._a)

    def __repr__(self):
        return repr(self._a)

    def __str__(self):
        return str(self._a)

    def __format__(self, spec):
        return format(self._a, spec)

    def __reduce__(self):
        return array, (self.get(),)

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    # --- attributes -----------------------------------------------------------------

    @property
    def shape(self):
        return self._a.shape

    @shape.setter
    def shape(self, value):
        reshaped = self._a.reshape(value)
        if not _np.shares_memory(reshaped, self._a) and self._a.size:
            raise AttributeError("incompatible shape for in-place modification")
        self._a = reshaped

    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    device = property(lambda self: cuda.Device(0))

    @property
    def flags(self):
        return _Flags(self._a.flags.c_contiguous, self._a.flags.f_contiguous,
                      self._a.base is None)

    @property
    def base(self):
        """None for an array that owns its memory; for a view, an array of the memory it
        views (not the same object CuPy would give)."""
        return None if self._a.base is None else ndarray._of(self._a.base)

    @property
    def data(self):
        return _MemoryPointer(self._a.__array_interface__["data"][0])

    @property
    def T(self):
        return ndarray._of(self._a.T)

    # --- container ------------------------------------------------------------------

    def __len__(self):
        if self._a.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    def __getitem__(self, key):
        key, advanced = _device_index(key, self._a.shape)
        if not advanced:                # a view, 0-d included, as CuPy's basic indexing
            key = key if _builtins.any(k is Ellipsis for k in key) else (*key, Ellipsis)
        return _wrap(self._a[key])

    def __setitem__(self, key, value):
        key, advanced = _device_index(key, self._a.shape)
        if advanced:
            targets = _np.arange(self._a.size).reshape(self._a.shape)[key]
            if _np.unique(targets).size != targets.size:
                raise IndexError("the CuPy stand-in refuses assigning through indices that "
                                 "hit one element twice: on CuPy the value stored is undefined")
        self._a[key] = _fill_value(value)

    # --- numpy protocols: dispatch NumPy's functions to this module's -------------------

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__":
            return NotImplemented
        ours = globals().get(ufunc.__name__)
        if not isinstance(ours, _Ufunc):
            return NotImplemented
        out = kwargs.get("out")
        if isinstance(out, tuple):
            if len(out) != 1:
                raise ValueError("The 'out' parameter must have exactly one array value")
            kwargs["out"] = out[0]
        for x in (*inputs, *((kwargs["out"],) if out is not None else ())):
            if not isinstance(x, (ndarray, _np.ndarray, *_SCALARS)):
                return NotImplemented
        if ufunc.__name__ in _COMPARISONS:      # CuPy's workaround for NumPy's 0-d arrays
            inputs = [x.item() if isinstance(x, _np.ndarray) and x.ndim == 0 else x
                      for x in inputs]
        return ours(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        module = _this_module
        try:
            for part in func.__module__.split(".")[1:]:
                module = getattr(module, part)
            ours = getattr(module, func.__name__)
        except AttributeError:
            return NotImplemented
        return ours(*args, **kwargs)

    # --- methods --------------------------------------------------------------------

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        result = self._a.astype(dtype, order=order, copy=copy)
        _check_dtype(result.dtype)
        return self if result is self._a else ndarray._of(result)

    def copy(self, order="C"):
        return ndarray._of(self._a.copy(order=order))

    def fill(self, value):
        self._a.fill(_fill_value(value))

    def take(self, indices, axis=None, out=None):
        """As CuPy's: out-of-bounds indices wrap around."""
        indices = indices._a if isinstance(indices, ndarray) else _np.asarray(indices)
        result = self._a.take(indices, axis=axis, mode="wrap", out=_unwrap(out))
        return out if out is not None else _wrap(result)


def _method(name):
    def method(self, *args, **kwargs):
        result = getattr(self._a, name)(*_unwrap(args), **_unwrap(kwargs))
        if "out" in kwargs and kwargs["out"] is not None:
            return kwargs["out"]
        return self if result is self._a else _wrap(result)
    method.__name__ = name
    return method


for _name in ("all", "any", "argmax", "argmin", "argsort", "clip", "conj", "cumsum",
              "diagonal", "dot", "flatten", "max", "mean", "min", "nonzero", "prod", "ravel",
              "repeat", "reshape", "round", "sort", "squeeze", "std", "sum", "swapaxes",
              "trace", "transpose", "var", "view"):
    setattr(ndarray, _name, _method(_name))


class _Flags:
    def __init__(self, c_contiguous, f_contiguous, owndata):
        self.c_contiguous, self.f_contiguous, self.owndata = c_contiguous, f_contiguous, owndata

    def __getitem__(self, name):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[name]


class _MemoryPointer:
    def __init__(self, ptr):
        self.ptr = ptr


# --- moving between the stand-in and NumPy ------------------------------------------

def _check_dtype(dtype):
    if _np.dtype(dtype).kind in "OSUVMm":
        raise ValueError(f"Unsupported dtype {_np.dtype(dtype)}")


def _wrap(result):
    """NumPy results as stand-in arrays: arrays, and scalars as 0-d arrays (CuPy's
    reductions return 0-d arrays); tuples and lists of them element by element."""
    if isinstance(result, _np.ndarray):
        return ndarray._of(result)
    if isinstance(result, _np.generic):
        return ndarray._of(_np.asarray(result))
    if isinstance(result, tuple) and hasattr(result, "_fields"):      # a named tuple
        return type(result)(*(_wrap(r) for r in result))
    if isinstance(result, (tuple, list)):
        return type(result)(_wrap(r) for r in result)
    return result


def _refuse_host(x):
    raise TypeError(f"Unsupported type {type(x)}: the CuPy stand-in refuses a NumPy array "
                    "where CuPy needs a device array (copy it with cupy.asarray first)")


def _unwrap(value):
    """Arguments of a non-ufunc function: stand-in arrays (also inside lists, tuples and
    dicts) become their NumPy memory; a NumPy array is refused, as CuPy refuses it."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, _np.ndarray):
        _refuse_host(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _operand(x):
    """An operand of a ufunc: a stand-in array or a scalar, nothing else (CuPy's rule)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _SCALARS):
        return x
    if isinstance(x, _np.ndarray):
        _refuse_host(x)
    raise TypeError(f"Unsupported type {type(x)}")


def _fill_value(value):
    """What may be assigned into a stand-in array: another, or a scalar (a 0-d NumPy
    array counts as one); CuPy refuses a non-scalar NumPy array here."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, _np.ndarray):
        if value.shape != ():
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill "
                             "(copy it to the device with cupy.asarray first)")
        return value.item()
    if isinstance(value, _SCALARS):
        return value
    raise TypeError(f"Unsupported type {type(value)}")


def _device_index(key, shape):
    """(key as a tuple of NumPy indices, whether it has array indices), with the integer
    arrays' out-of-bounds entries wrapped around, as CuPy does. Lists and NumPy arrays
    in an index are taken, as CuPy copies them to the device."""
    parts = []
    for part in key if isinstance(key, tuple) else (key,):
        if isinstance(part, ndarray):
            part = part._a
        elif isinstance(part, (list, _np.ndarray)):
            part = _np.asarray(part)
        parts.append(part)
    arrays = [p for p in parts if isinstance(p, _np.ndarray)]
    explicit = _builtins.sum(p.ndim if p.dtype == bool else 1 for p in arrays) + _builtins.sum(
        1 for p in parts if not isinstance(p, _np.ndarray) and p is not None and p is not Ellipsis)
    axis, wrapped = 0, []
    for part in parts:
        if part is Ellipsis:
            axis += len(shape) - explicit
        elif isinstance(part, _np.ndarray) and part.dtype.kind in "iu":
            if axis < len(shape) and shape[axis] > 0:
                part = part % shape[axis]
            axis += 1
        elif isinstance(part, _np.ndarray):
            axis += part.ndim if part.dtype == bool else 1
        elif part is not None:
            axis += 1
        wrapped.append(part)
    return tuple(wrapped), bool(arrays)


# --- ufuncs -------------------------------------------------------------------------

class _Ufunc:
    """A ufunc that takes only stand-in arrays and scalars (``out`` a stand-in array).
    It has no ``at``, ``reduce``, ``outer`` or ``accumulate``: minicnn needs none, and
    CuPy's support for them is partial."""

    def __init__(self, name):
        self._ufunc = getattr(_np, name)
        self.__name__ = name
        self.nin, self.nout = self._ufunc.nin, self._ufunc.nout

    def __call__(self, *args, out=None, dtype=None, casting="same_kind"):
        if len(args) > self.nin:
            if out is not None or len(args) > self.nin + 1:
                raise TypeError(f"{self.__name__}: wrong number of arguments")
            args, out = args[:self.nin], args[self.nin]
        inputs = [_operand(x) for x in args]
        if out is not None and not isinstance(out, ndarray):
            if isinstance(out, _np.ndarray):
                _refuse_host(out)
            raise TypeError(f"out must be a cupy.ndarray, not {type(out)}")
        result = self._ufunc(*inputs, out=None if out is None else out._a, dtype=dtype,
                             casting=casting)
        return out if out is not None else _wrap(result)

    def __repr__(self):
        return f"<ufunc '{self.__name__}' (CuPy stand-in)>"


_COMPARISONS = ("greater", "greater_equal", "less", "less_equal", "equal", "not_equal")
_UFUNCS = ("add", "subtract", "multiply", "divide", "true_divide", "floor_divide",
           "negative", "positive", "power", "remainder", "mod", "absolute", "abs", "fabs",
           "sqrt", "square", "reciprocal", "exp", "exp2", "expm1", "log", "log2", "log10",
           "log1p", "sin", "cos", "tan", "tanh", "sign", "floor", "ceil", "trunc", "rint",
           "maximum", "minimum", "fmax", "fmin", "logical_and", "logical_or", "logical_not",
           "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "invert",
           "left_shift", "right_shift", "isfinite", "isinf", "isnan", "signbit", "copysign",
           "matmul", *_COMPARISONS)
for _name in _UFUNCS:
    globals()[_name] = _Ufunc(_name)


def _binary(name, reflected=False):
    def operator(self, other):
        if not isinstance(other, ndarray) and getattr(other, "__array_ufunc__", 0) is None:
            return NotImplemented
        function = globals()[name]
        return function(other, self) if reflected else function(self, other)
    return operator


def _in_place(name):
    def operator(self, other):
        return globals()[name](self, other, out=self)
    return operator


for _dunder, _name in (("add", "add"), ("sub", "subtract"), ("mul", "multiply"),
                       ("truediv", "true_divide"), ("floordiv", "floor_divide"),
                       ("mod", "remainder"), ("pow", "power"), ("matmul", "matmul"),
                       ("and", "bitwise_and"), ("or", "bitwise_or"), ("xor", "bitwise_xor"),
                       ("lshift", "left_shift"), ("rshift", "right_shift")):
    setattr(ndarray, f"__{_dunder}__", _binary(_name))
    setattr(ndarray, f"__r{_dunder}__", _binary(_name, reflected=True))
    setattr(ndarray, f"__i{_dunder}__", _in_place(_name))
for _dunder, _name in (("lt", "less"), ("le", "less_equal"), ("eq", "equal"),
                       ("ne", "not_equal"), ("gt", "greater"), ("ge", "greater_equal")):
    setattr(ndarray, f"__{_dunder}__", _binary(_name))
ndarray.__neg__ = lambda self: negative(self)          # noqa: F821 (made above)
ndarray.__pos__ = lambda self: self
ndarray.__abs__ = lambda self: absolute(self)          # noqa: F821
ndarray.__invert__ = lambda self: invert(self)         # noqa: F821


# --- functions ----------------------------------------------------------------------

def _function(name):
    numpy_function = getattr(_np, name)

    def function(*args, **kwargs):
        out = kwargs.get("out")
        if out is not None and not isinstance(out, ndarray):
            raise TypeError(f"out must be a cupy.ndarray, not {type(out)}")
        result = numpy_function(*_unwrap(args), **_unwrap(kwargs))
        if out is not None:
            return out
        wrapped = _wrap(result)
        if isinstance(wrapped, ndarray):
            _check_dtype(wrapped.dtype)
        return wrapped
    function.__name__ = name
    return function


# Made from a shape (no array in): zeros, ones, ... Taking device arrays only: the rest.
for _name in ("zeros", "ones", "empty", "full", "arange", "linspace", "eye", "identity",
              "zeros_like", "ones_like", "empty_like", "full_like", "ascontiguousarray",
              "concatenate", "stack", "hstack", "vstack", "where", "broadcast_to",
              "broadcast_arrays", "reshape", "transpose", "moveaxis", "swapaxes", "expand_dims",
              "squeeze", "ravel", "flip", "fliplr", "flipud", "pad", "tile", "repeat",
              "split", "einsum", "dot", "tensordot", "outer", "sum", "mean", "var", "std",
              "prod", "cumsum", "max", "min", "amax", "amin", "argmax", "argmin", "argsort",
              "sort", "bincount", "clip", "round", "around", "all", "any", "count_nonzero",
              "nonzero", "argwhere", "unique", "allclose", "isclose", "array_equal", "diag",
              "trace", "copy", "shares_memory", "may_share_memory", "atleast_1d",
              "atleast_2d", "shape", "ndim", "size"):
    if _name not in globals():
        globals()[_name] = _function(_name)


def take(a, indices, axis=None, out=None):
    """As CuPy's: out-of-bounds indices wrap around."""
    if not isinstance(a, ndarray):
        _refuse_host(a)
    return a.take(indices, axis, out)


def asarray(a, dtype=None, order=None, *, blocking=False):
    """A stand-in array of ``a``: the array itself if it is one already (cast if
    ``dtype`` differs), else a copy of the host data (as CuPy copies it to the GPU)."""
    if isinstance(a, ndarray):
        return a if dtype is None else a.astype(dtype, copy=False)
    host = _np.array(a, dtype=dtype, order=order or "K", copy=True)
    _check_dtype(host.dtype)
    return ndarray._of(host)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        host = _np.array(obj._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin)
        return obj if host is obj._a else ndarray._of(host)
    host = _np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    _check_dtype(host.dtype)
    return ndarray._of(host)


asanyarray = asarray


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """A NumPy array of ``a``: a host copy of a stand-in array, or numpy.asarray(a)."""
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    """This module if any argument is one of its arrays, else numpy."""
    return _this_module if _builtins.any(isinstance(a, ndarray) for a in args) else _np


# --- submodules: random, lib.stride_tricks, cuda ------------------------------------

class Generator:
    """CuPy's Generator has these methods only; each returns a stand-in array (0-d
    when ``size`` is None). The stream is not NumPy's: the seed goes through
    SeedSequence down to 32 bits, as CuPy's cuRAND generators take it, into Philox."""

    def __init__(self, seed=None):
        if isinstance(seed, ndarray):
            seed = seed.get()
        state = _np.random.SeedSequence(seed).generate_state(1, _np.uint32)[0]
        self._generator = _np.random.Generator(_np.random.Philox(int(state)))

    def random(self, size=None, dtype=_np.float64, out=None):
        native = dtype if _np.dtype(dtype).char in "fd" else _np.float64
        return _into(self._generator.random(size, dtype=native).astype(dtype), out)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=_np.float64):
        low, high = asarray(low), asarray(high)
        if size is None:
            size = _np.broadcast_shapes(low.shape, high.shape)
        y = ndarray._of(self._generator.random(size))
        return (low + (high - low) * y).astype(dtype, copy=False)

    def integers(self, low, high=None, size=None, dtype=_np.int64, endpoint=False):
        low, high = (0, int(low)) if high is None else (int(low), int(high))
        values = self._generator.integers(low, high, size, dtype=_np.int64, endpoint=endpoint)
        return ndarray._of(_np.asarray(values).astype(dtype))

    def standard_normal(self, size=None, dtype=_np.float64, out=None):
        if _np.dtype(dtype).char not in "fd":
            raise TypeError(f"Unsupported dtype {_np.dtype(dtype).name} for standard_normal")
        return _into(self._generator.standard_normal(size).astype(dtype), out)

    def standard_exponential(self, size=None, dtype=_np.float64, method="inv", out=None):
        return _into(self._generator.standard_exponential(size).astype(dtype), out)

    def exponential(self, scale=1.0, size=None):
        return self.standard_exponential(size) * scale


def _into(values, out):
    values = ndarray._of(_np.asarray(values))
    if out is None:
        return values
    out[...] = values
    return out


def _default_rng(seed=None):
    return seed if isinstance(seed, Generator) else Generator(seed)


random = _types.ModuleType(__name__ + ".random", "CuPy's random module: default_rng only.")
random.default_rng, random.Generator = _default_rng, Generator


def _as_strided(x, shape=None, strides=None):
    """CuPy's as_strided: no ``subok``, no ``writeable`` (the view is writable)."""
    if not isinstance(x, ndarray):
        _refuse_host(x)
    return ndarray._of(_np.lib.stride_tricks.as_strided(x._a, shape, strides))


lib = _types.ModuleType(__name__ + ".lib")
lib.stride_tricks = _types.ModuleType(__name__ + ".lib.stride_tricks")
lib.stride_tricks.as_strided = _as_strided


class _Device:
    """cupy.cuda.Device: the one stand-in GPU, number 0."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise RuntimeError(f"cudaErrorInvalidDevice: the stand-in has one device, not {device}")

    def synchronize(self):
        cuda.synchronize_calls += 1

    def use(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    __hash__ = object.__hash__
    compute_capability = "00"


def _device_properties(device=0):
    return {"name": b"CuPy stand-in (NumPy on the CPU)", "totalGlobalMem": 0,
            "multiProcessorCount": 0}


def _linalg_function(name):
    numpy_function = getattr(_np.linalg, name)

    def function(*args, **kwargs):
        return _wrap(numpy_function(*_unwrap(args), **_unwrap(kwargs)))
    function.__name__ = name
    return function


linalg = _types.ModuleType(__name__ + ".linalg", "CuPy's linalg: the functions minicnn uses.")
for _name in ("eigh", "norm", "inv", "solve", "svd", "qr", "cholesky"):
    setattr(linalg, _name, _linalg_function(_name))


cuda = _types.ModuleType(__name__ + ".cuda")
cuda.Device = _Device
cuda.synchronize_calls = 0
cuda.get_device_id = lambda: 0
cuda.runtime = _types.ModuleType(__name__ + ".cuda.runtime")
cuda.runtime.getDeviceCount = lambda: 1
cuda.runtime.getDeviceProperties = _device_properties
cuda.runtime.runtimeGetVersion = lambda: 0
cuda.runtime.driverGetVersion = lambda: 0

_this_module = _sys.modules[__name__]
