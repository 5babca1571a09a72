"""The CuPy stand-in (tests/fake_cupy.py) fails where CuPy fails: if it did not, the
suite's second run on it (MINICNN_FAKE_CUPY=tests.fake_cupy) would prove nothing."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from minicnn import backend
from minicnn.backend import BackendError

cp = importlib.import_module("tests.fake_cupy")


def test_no_implicit_conversion_to_numpy():
    a = cp.arange(6.0).reshape(2, 3)
    for convert in (np.asarray, np.array, lambda v: np.float64(v), lambda v: np.zeros(6) + v,
                    lambda v: np.testing.assert_array_equal(v, v)):
        with pytest.raises(TypeError):
            convert(a)
    host = a.get()
    assert type(host) is np.ndarray and host.tolist() == [[0, 1, 2], [3, 4, 5]]
    host[0, 0] = 7                       # a copy: the device array is unchanged
    assert float(a[0, 0]) == 0.0 and cp.asnumpy(a).tolist() == a.tolist()


@pytest.mark.parametrize("mix", [
    lambda a, h: a + h, lambda a, h: h + a, lambda a, h: a * h, lambda a, h: h - a,
    lambda a, h: a @ h, lambda a, h: a < h, lambda a, h: cp.maximum(a, h),
    lambda a, h: np.maximum(h, a), lambda a, h: cp.where(h > 0, a, 0),
    lambda a, h: cp.concatenate([a, h]), lambda a, h: np.stack([a, h]),
    lambda a, h: a + [1.0, 2.0, 3.0], lambda a, h: cp.multiply(a, 2, out=h),
    lambda a, h: cp.zeros_like(h), lambda a, h: cp.ascontiguousarray(h),
    lambda a, h: cp.lib.stride_tricks.as_strided(h, (2,), (8,)), lambda a, h: a.dot(h.T),
])
def test_mixing_host_and_device_arrays_fails(mix):
    a, h = cp.ones((3, 3)), np.ones((3, 3))
    with pytest.raises(TypeError):
        mix(a, h)


def test_in_place_and_assignment_from_the_host_fail():
    a = cp.zeros((2, 3))
    with pytest.raises(TypeError):
        a += np.ones(3)
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        a[...] = np.ones((2, 3))
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        a[0] = np.ones(3)
    a[0] = np.float32(2)                 # scalars, NumPy's included, are fine
    a[1] = np.array(3.0)
    a += 1
    assert a.tolist() == [[3, 3, 3], [4, 4, 4]]


def test_scalars_and_copies_from_the_host_are_fine():
    a = cp.asarray(np.arange(3.0))
    assert (np.float32(2) * a).tolist() == [0, 2, 4] and (1 - a).tolist() == [1, 0, -1]
    host = np.arange(3.0)
    b = cp.asarray(host)
    host[0] = 9                           # the device copy does not alias host memory
    assert b.tolist() == [0, 1, 2]
    assert cp.asarray(b) is b and cp.asarray(b, dtype=cp.float32).dtype == np.float32
    assert type(np.concatenate([a, b])) is cp.ndarray      # NumPy functions dispatch to it
    with pytest.raises(ValueError, match="Unsupported dtype"):
        cp.asarray(np.array(["a"]))


def test_out_of_bounds_array_indices_wrap_around_as_in_cupy():
    a = cp.arange(3)
    assert a[[1, 3]].tolist() == [1, 0] and a[cp.asarray([-4, 5])].tolist() == [2, 2]
    assert a.take([4]).tolist() == [1] and cp.take(a, [3]).tolist() == [0]
    grid = cp.arange(6).reshape(2, 3)
    assert grid[[0, 1], [3, 4]].tolist() == [0, 4]
    assert grid[..., [3]].tolist() == [[0], [3]]
    a[[1, 3]] = 10
    assert a.tolist() == [10, 10, 2]
    with pytest.raises(IndexError):
        a[3]                              # a plain integer is checked, as in CuPy


def test_assigning_twice_to_one_element_is_refused():
    a = cp.zeros(3)
    with pytest.raises(IndexError, match="twice"):
        a[[0, 3]] = cp.asarray([1.0, 2.0])     # 3 wraps to 0
    a[[0, 1]] = cp.asarray([1.0, 2.0])
    a[a > 1.5] = 5.0
    assert a.tolist() == [1, 5, 0]


def test_scalars_are_0d_arrays_and_views():
    a = cp.arange(6.0).reshape(2, 3)
    for value in (a.sum(), a[1, 2], a.max(axis=None), next(iter(a[0])), cp.sum(a)):
        assert type(value) is cp.ndarray and value.shape == ()
    corner = a[1, 2]
    corner += 10                          # a view, as CuPy's basic indexing gives
    assert float(a[1, 2]) == 15.0 and int(a[0, 1]) == 1 and bool(a[0, 1])
    assert f"{a.sum():.1f}" == "25.0"
    with pytest.raises(TypeError):
        range(cp.asarray(3))              # no __index__


def test_the_generator_has_its_own_stream_and_only_cupys_methods():
    g = cp.random.default_rng(0)
    values = g.random(5)
    assert type(values) is cp.ndarray
    assert not np.allclose(values.get(), np.random.default_rng(0).random(5))
    np.testing.assert_array_equal(cp.random.default_rng(0).random(5).get(), values.get())
    assert g.integers(0, 3).shape == () and g.uniform(-1, 1, size=4, dtype=np.float32).dtype \
        == np.float32
    assert g.standard_normal((2, 2)).shape == (2, 2)
    for numpy_only in ("permutation", "choice", "shuffle", "normal"):
        assert not hasattr(g, numpy_only)


def test_as_strided_has_no_writeable_and_flags_only_three_fields():
    a = cp.arange(6.0)
    view = cp.lib.stride_tricks.as_strided(a, (2, 2), (8, 16))
    assert view.tolist() == [[0, 2], [1, 3]]
    with pytest.raises(TypeError):
        cp.lib.stride_tricks.as_strided(a, (2,), (8,), writeable=False)
    assert a.flags.c_contiguous and a.flags.owndata and not view.flags.owndata
    with pytest.raises(AttributeError):
        a.flags.writeable


def test_devices_and_modules():
    assert cp.cuda.runtime.getDeviceCount() == 1
    before = cp.cuda.synchronize_calls
    cp.cuda.Device().synchronize()
    assert cp.cuda.synchronize_calls == before + 1
    assert cp.get_array_module(np.ones(1), cp.ones(1)) is cp
    assert cp.get_array_module(np.ones(1)) is np
    assert cp.float32 is np.float32


def test_the_backend_imports_the_module_the_variable_names(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setenv(backend.FAKE_CUPY_VARIABLE, "tests.fake_cupy")
    assert backend.use("cupy") == "cupy" and backend.xp is cp
    x = backend.to_device(np.ones((2, 2), np.float32))
    assert type(x) is cp.ndarray and backend.array_module(x) is cp and not backend.on_cpu(x)
    assert type(backend.to_host(x)) is np.ndarray and backend.is_array(x)
    before = cp.cuda.synchronize_calls
    backend.synchronize()
    assert cp.cuda.synchronize_calls == before + 1
    backend.use("numpy")
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setenv(backend.FAKE_CUPY_VARIABLE, "tests.no_such_module")
    with pytest.raises(BackendError, match="no_such_module"):
        backend.use("cupy")


def test_ci_runs_the_whole_suite_again_on_the_stand_in():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "\nMINICNN_FAKE_CUPY=tests.fake_cupy python -m pytest\n" in ci
