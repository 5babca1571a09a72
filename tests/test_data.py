"""CIFAR-10 finding, downloading (md5), loading, validation and augmentation,
on tiny folders and tarballs built here; on the real data where it is present."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
from conftest import REAL_DATA, make_cifar_folder, make_tarball, requires_real_data, write_batch

from minicnn import backend, data
from minicnn.data import DataError


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_load_from_folder_and_parent_folder(tiny_cifar):
    for location in (tiny_cifar, tiny_cifar.parent):
        train, test = data.load_cifar10(location, download=False)
        assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == np.uint8
        assert test.images.shape == (20, 3, 32, 32) and test.labels.dtype == np.int64
        assert train.class_names == data.CLASS_NAMES


def test_images_keep_the_official_row_layout(tmp_path):
    """Each row is 1024 red, 1024 green, 1024 blue values, row-major."""
    folder = make_cifar_folder(tmp_path)
    image = np.zeros((1, 3, 32, 32), np.uint8)
    image[0, 0, 0, 1] = 7      # red, row 0, column 1
    image[0, 2, 31, 0] = 9     # blue, last row, column 0
    write_batch(folder / "test_batch", image, [4])
    _, test = data.load_cifar10(folder, download=False)
    assert test.images[0, 0, 0, 1] == 7 and test.images[0, 2, 31, 0] == 9
    assert test.labels.tolist() == [4]


def test_environment_variable(tiny_cifar, monkeypatch):
    monkeypatch.setenv("MINICNN_DATA", str(tiny_cifar))
    assert data.find_cifar10(download=False) == tiny_cifar


def test_tarball_is_verified_and_unpacked(tmp_path, tiny_cifar):
    tarball = make_tarball(tiny_cifar, tmp_path / "cifar-10-python.tar.gz")
    folder = data.extract_tarball(tarball, tmp_path / "out", md5=md5(tarball))
    assert (folder / "test_batch").is_file()
    with pytest.raises(DataError, match="md5"):
        data.extract_tarball(tarball, tmp_path / "out2")     # the official md5 does not match
    assert not (tmp_path / "out2" / "cifar-10-batches-py").exists()


@pytest.mark.parametrize("modern_tarfile", [True, False])
def test_tarball_entries_outside_the_folder_are_refused(tmp_path, monkeypatch, modern_tarfile):
    import io
    import tarfile
    if not modern_tarfile:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    tarball = tmp_path / "evil.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DataError, match="cannot unpack"):
        data.extract_tarball(tarball, tmp_path / "out", md5=None)
    assert not (tmp_path / "out" / "escaped.txt").exists()   # one level above the staging folder


def test_a_tarball_given_as_data_dir_is_unpacked_once(tmp_path, tiny_cifar, monkeypatch):
    tarball = make_tarball(tiny_cifar, tmp_path / "cifar-10-python.tar.gz")
    monkeypatch.setattr(data, "CIFAR10_MD5", md5(tarball))
    folder = data.find_cifar10(tarball)
    assert folder == tmp_path / "cifar-10-batches-py"
    marker = folder / "kept"
    marker.write_text("still here")
    assert data.find_cifar10(tarball) == folder and marker.exists()


def test_download_from_url_with_md5(tmp_path, tiny_cifar):
    tarball = make_tarball(tiny_cifar, tmp_path / "served.tar.gz")
    folder = data.download_cifar10(tmp_path / "cache", url=tarball.as_uri(), md5=md5(tarball),
                                   progress=False)
    assert data.load_cifar10(folder, download=False)[0].images.shape == (100, 3, 32, 32)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["cifar-10-batches-py"]


def test_download_with_wrong_md5_keeps_nothing(tmp_path, tiny_cifar):
    tarball = make_tarball(tiny_cifar, tmp_path / "served.tar.gz")
    with pytest.raises(DataError, match="md5"):
        data.download_cifar10(tmp_path / "cache", url=tarball.as_uri(), progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_download_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError) as info:
        data.download_cifar10(tmp_path / "cache", url="http://127.0.0.1:9/cifar-10-python.tar.gz",
                              progress=False)
    message = str(info.value)
    assert "could not download" in message and str(tmp_path / "cache") in message
    assert "MINICNN_DATA" in message and "\n" not in message


def test_folder_without_batches(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(DataError, match="no CIFAR-10 python batches"):
        data.find_cifar10(tmp_path / "junk")


@pytest.mark.parametrize("corrupt", ["shape", "labels", "count", "garbage", "missing", "code"])
def test_invalid_batches_are_rejected(tmp_path, corrupt):
    folder = make_cifar_folder(tmp_path)
    target = folder / "data_batch_3"
    if corrupt == "shape":
        with open(target, "wb") as f:
            pickle.dump({b"data": np.zeros((5, 100), np.uint8), b"labels": [0] * 5}, f)
    elif corrupt == "labels":
        write_batch(target, np.zeros((5, 3, 32, 32), np.uint8), [0, 1, 2, 3, 10])
    elif corrupt == "count":
        write_batch(target, np.zeros((5, 3, 32, 32), np.uint8), [0, 1])
    elif corrupt == "garbage":
        target.write_bytes(b"not a pickle at all")
    elif corrupt == "missing":
        target.unlink()
    elif corrupt == "code":   # a pickle that would run code is refused, not executed
        target.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(DataError, match="data_batch_3"):
        data.load_cifar10(folder, download=False)


def test_normalize(xp):
    images = xp.full((2, 3, 4, 4), 255, dtype=xp.uint8)
    out = data.normalize(images, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert out.dtype == xp.float32
    np.testing.assert_allclose(backend.to_host(out[0, :, 0, 0]), [2.0, 1.0, 0.5], rtol=1e-6)


def test_random_flip_and_crop(xp):
    images = xp.arange(2 * 1 * 4 * 4, dtype=xp.uint8).reshape(2, 1, 4, 4)
    flipped = data.random_flip(images, xp.asarray([True, False]))
    mirrored = backend.to_host(images[0, :, :, ::-1])
    np.testing.assert_array_equal(backend.to_host(flipped[0]), mirrored)
    np.testing.assert_array_equal(backend.to_host(flipped[1]), backend.to_host(images[1]))
    offsets = xp.asarray([[1, 1], [0, 2]])       # padding 1: (1, 1) is the identity
    cropped = backend.to_host(data.random_crop(images, offsets, padding=1))
    np.testing.assert_array_equal(cropped[0], backend.to_host(images[0]))
    # offset (0, 2): shifted down by one row and left by one column, zeros entering
    expected = np.zeros((1, 4, 4), np.uint8)
    expected[:, 1:, :3] = backend.to_host(images[1])[:, :3, 1:]
    np.testing.assert_array_equal(cropped[1], expected)


def test_epoch_plan_is_a_seeded_permutation(xp):
    a = data.plan_epoch(50, seed=1, epoch=3, crop_padding=4)
    b = data.plan_epoch(50, seed=1, epoch=3, crop_padding=4)
    c = data.plan_epoch(50, seed=1, epoch=4, crop_padding=4)
    order = backend.to_host(a.order)
    assert sorted(order.tolist()) == list(range(50))
    np.testing.assert_array_equal(order, backend.to_host(b.order))
    assert not np.array_equal(order, backend.to_host(c.order))
    offsets = backend.to_host(a.offsets)
    assert offsets.min() >= 0 and offsets.max() <= 8


def test_batch_slices():
    assert data.batch_slices(10, 4) == [(0, 4), (4, 8), (8, 10)]


@requires_real_data
def test_real_cifar10():
    train, test = data.load_cifar10(REAL_DATA, download=False)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert np.bincount(train.labels).tolist() == [5000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    mean = (train.images / 255.0).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, data.CIFAR10_MEAN, rtol=1e-5)
