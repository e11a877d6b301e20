"""The HDF5 schema: round trip, atomic writes, and every reader error path."""

import json

import h5py
import numpy as np
import pytest
from conftest import make_dataset

from augflow.data.store import SCHEMA_VERSION, DatasetWriter, SliceDataset, read_images, read_info
from augflow.errors import DataError


def test_round_trip(tmp_path):
    path = make_dataset(tmp_path / "d.h5", n_subjects=4, slices=2, num_classes=2, shape=(1, 8, 8))
    info = read_info(path)
    assert info.image_shape == (1, 8, 8) and len(info) == 8
    assert info.class_names == ["class0", "class1"]
    assert info.source == "real" and info.schema_version == SCHEMA_VERSION
    assert info.provenance == {"test": True}
    assert list(info.subjects[:2]) == ["sub-000", "sub-000"]
    assert info.class_counts() == {"class0": 4, "class1": 4}
    with h5py.File(path) as f:
        assert f["images"].dtype == np.float32 and f["images"].compression == "gzip"
        assert f["labels"].dtype == np.int64
    images = read_images(path)
    assert images.shape == (8, 1, 8, 8)
    np.testing.assert_array_equal(read_images(path, [5, 1]), images[[5, 1]])


def test_lazy_dataset_reads_rows(tmp_path):
    path = make_dataset(tmp_path / "d.h5")
    ds = SliceDataset(path, indices=[3, 0])
    image, label = ds[0]
    assert image.shape == (1, 8, 8) and label == read_info(path).labels[3]
    np.testing.assert_array_equal(image.numpy(), read_images(path, [3])[0])
    assert ds._images is not None and len(ds) == 2


def test_interrupted_writer_leaves_nothing(tmp_path):
    out = tmp_path / "out.h5"
    with pytest.raises(RuntimeError):
        with DatasetWriter(out, (1, 4, 4), ["a"]) as writer:
            writer.append(np.zeros((2, 1, 4, 4)), [0, 0], ["s", "s"], [0, 1])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_values(tmp_path):
    with pytest.raises(DataError, match="out of range"):
        with DatasetWriter(tmp_path / "x.h5", (1, 4, 4), ["a", "b"]) as writer:
            writer.append(np.zeros((1, 1, 4, 4)), [2], ["s"], [0])
    with pytest.raises(DataError, match="NaN or Inf"):
        with DatasetWriter(tmp_path / "x.h5", (1, 4, 4), ["a"]) as writer:
            writer.append(np.full((1, 1, 4, 4), np.nan), [0], ["s"], [0])
    with pytest.raises(DataError, match="source"):
        DatasetWriter(tmp_path / "x.h5", (1, 4, 4), ["a"], source="fake")
    assert list(tmp_path.iterdir()) == []


def _corrupt(path, action):
    with h5py.File(path, "r+") as f:
        action(f)


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda f: f.__delitem__("labels"), "dataset 'labels' is missing"),
        (lambda f: f.attrs.__setitem__("schema_version", 99), "unknown schema_version 99"),
        (lambda f: f.attrs.__delitem__("schema_version"), "'schema_version' is missing"),
        (lambda f: f["labels"].__setitem__(0, 7), "label 7 at row 0 is out of range"),
        (lambda f: f["images"].__setitem__((2, 0, 0, 0), np.inf), "row 2 contains NaN or Inf"),
        (lambda f: f["images"].__setitem__((1, 0, 0, 0), 1.5), "row 1 has values outside"),
        (lambda f: f.attrs.__setitem__("class_names", "not json"), "not JSON"),
        (lambda f: f.attrs.__setitem__("source", "made-up"), "'source' must be one of"),
    ],
)
def test_reader_errors_name_file_and_problem(tmp_path, action, message):
    path = make_dataset(tmp_path / "d.h5")
    _corrupt(path, action)
    with pytest.raises(DataError, match=message) as e:
        read_info(path)
    assert str(path) in str(e.value)


def test_reader_wrong_dtype_and_shape(tmp_path):
    path = make_dataset(tmp_path / "d.h5")

    def to_float64(f):
        data = f["images"][:]
        del f["images"]
        f["images"] = data.astype(np.float64)

    _corrupt(path, to_float64)
    with pytest.raises(DataError, match="'images' must be float32"):
        read_info(path)
    path = make_dataset(tmp_path / "e.h5")

    def short_labels(f):
        data = f["labels"][:-1]
        del f["labels"]
        f["labels"] = data

    _corrupt(path, short_labels)
    with pytest.raises(DataError, match="'labels' must be integer"):
        read_info(path)


def test_reader_not_hdf5_and_missing(tmp_path):
    bogus = tmp_path / "bogus.h5"
    bogus.write_text("hello")
    with pytest.raises(DataError, match="not a readable HDF5"):
        read_info(bogus)
    with pytest.raises(DataError, match="file not found"):
        read_info(tmp_path / "nope.h5")


def test_provenance_is_json(tmp_path):
    path = make_dataset(tmp_path / "d.h5")
    with h5py.File(path) as f:
        assert json.loads(f.attrs["provenance"]) == {"test": True}
        assert json.loads(f.attrs["class_names"]) == ["class0", "class1", "class2"]


def test_read_images_any_order_with_repeats(tmp_path):
    path = make_dataset(tmp_path / "d.h5")
    images = read_images(path)
    np.testing.assert_array_equal(read_images(path, [5, 1, 5, 0]), images[[5, 1, 5, 0]])
    assert read_images(path, []).shape == (0, 1, 8, 8)


def test_written_files_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        path = make_dataset(tmp_path / "d.h5")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640  # not mkstemp's 0600
