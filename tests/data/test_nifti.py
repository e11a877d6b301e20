"""Tests of augflow.data.nifti: manifest -> NIfTI volumes -> normalised square slices in HDF5."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from augflow.data.nifti import (
    NORMALISATION,
    PrepareResult,
    extract_slices,
    load_volume,
    prepare_dataset,
    read_manifest,
)
from augflow.data.store import read_images, read_info
from augflow.errors import ConfigError, ManifestError

SHAPE = (20, 24, 18)


def blob(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric, strictly positive volume (no slice is constant, flips are visible)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    centre = rng.uniform(-0.3, 0.3, size=3)
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    x, y, z = grids
    return (100 + 900 * np.exp(-3 * r2) + 150 * x + 80 * z + 40 * y).astype(np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def write_manifest(path: Path, rows: list[str], header: str = "path,label,subject") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def prepare(manifest: Path, out: Path, **kwargs) -> PrepareResult:
    kwargs = {"size": 16, "slices_per_volume": 3, "progress": False, **kwargs}
    return prepare_dataset(manifest, out, **kwargs)


def assert_nothing_written(out: Path) -> None:
    """No output file and no stray temporary file in the output folder."""
    assert not out.exists()
    leftovers = os.listdir(out.parent) if out.parent.exists() else []
    assert leftovers == [], leftovers


def only_image(tmp_path: Path, name: str, data: np.ndarray, affine=None, **kwargs) -> np.ndarray:
    """Prepare a one-volume manifest and return its images."""
    save(tmp_path / name, data, affine)
    manifest = write_manifest(tmp_path / f"{name}.csv", [f"{name},a"], header="path,label")
    out = tmp_path / f"{name}.h5"
    prepare(manifest, out, **kwargs)
    return read_images(out)


# --- happy path -----------------------------------------------------------------------------


def test_happy_path(tmp_path):
    for i, name in enumerate(["s1.nii.gz", "s2.nii", "s3.nii.gz"]):
        save(tmp_path / "vols" / name, blob(seed=i))
    manifest = write_manifest(
        tmp_path / "manifest.csv",
        [
            f"{tmp_path / 'vols' / 's1.nii.gz'},patient,subj-A",
            f"{tmp_path / 'vols' / 's2.nii'},control,",  # subject defaults to the stem
            f"{tmp_path / 'vols' / 's3.nii.gz'},patient,subj-C",
        ],
    )
    out = tmp_path / "out" / "data.h5"
    result = prepare(manifest, out, size=32, slices_per_volume=5, axis="coronal")

    assert result == PrepareResult(out, 15, 3, ["control", "patient"], [])
    info = read_info(out)  # validates schema and values
    images = read_images(out)
    assert images.shape == (15, 1, 32, 32) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.9
    assert info.class_names == ["control", "patient"]
    assert info.labels.tolist() == [1] * 5 + [0] * 5 + [1] * 5
    assert info.subjects.tolist() == ["subj-A"] * 5 + ["s2"] * 5 + ["subj-C"] * 5
    assert info.slice_index.tolist() == [0, 1, -1, 2, -2] * 3
    assert info.source == "real"
    prov = info.provenance
    assert prov["generator"] == "augflow prepare"
    assert prov["manifest"] == str(manifest.resolve())
    assert prov["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert (prov["size"], prov["slices_per_volume"], prov["axis"]) == (32, 5, "coronal")
    assert prov["normalisation"] == NORMALISATION
    assert prov["n_volumes"] == 3 and prov["skipped"] == []
    assert os.listdir(out.parent) == ["data.h5"]


@pytest.mark.parametrize(("length", "centre"), [(24, 11), (23, 11), (5, 2), (4, 1)])
def test_slices_are_the_central_ones_in_order(length, centre):
    data = blob((20, length, 18))
    n = min(5, length)  # also the edge case of every slice of the volume
    images, offsets = extract_slices(data, (1.0, 1.0, 1.0), "coronal", n, 18)
    assert offsets.tolist() == [0, 1, -1, 2, -2][:n]
    for image, offset in zip(images, offsets, strict=True):
        one = data[:, centre + offset : centre + offset + 1]  # that coronal slice alone
        expected, _ = extract_slices(one, (1, 1, 1), "coronal", 1, 18)
        np.testing.assert_allclose(image, expected[0], atol=1e-6)
    with pytest.raises(ValueError, match="fewer than"):
        extract_slices(data, (1.0, 1.0, 1.0), "coronal", length + 1, 18)


@pytest.mark.parametrize(
    ("axis", "corner"),
    [
        ("coronal", "top-left"),  # superior up, subject's left (low x) on the left
        ("sagittal", "top-right"),  # superior up, anterior (high y) on the right
        ("axial", "top-left"),  # anterior up, subject's left on the left
    ],
)
def test_display_orientation(tmp_path, axis, corner):
    data = np.full((18, 18, 18), 0.1, dtype=np.float32)
    data += np.linspace(0, 0.1, 18, dtype=np.float32)[:, None, None]  # not constant anywhere
    # Bright bars through the centre slices: left-superior (seen in the coronal slice),
    # anterior-superior (sagittal) and left-anterior (axial).
    data[:6, :, 12:] = data[:, 12:, 12:] = data[:6, 12:, :] = 0.9
    images, _ = extract_slices(data, (1, 1, 1), axis, 1, 18)
    image = images[0, 0]
    quadrants = {
        "top-left": image[:6, :6],
        "top-right": image[:6, 12:],
        "bottom-left": image[12:, :6],
        "bottom-right": image[12:, 12:],
    }
    assert quadrants[corner].min() > 0.5
    assert all(q.max() < 0.5 for name, q in quadrants.items() if name != corner)


def test_relative_paths_are_relative_to_the_manifest(tmp_path, monkeypatch):
    save(tmp_path / "study" / "vols" / "a.nii.gz", blob(seed=1))
    save(tmp_path / "study" / "b.nii", blob(seed=2))
    write_manifest(
        tmp_path / "study" / "manifest.csv", ["vols/a.nii.gz,x", "./b.nii,y"], header="path,label"
    )
    monkeypatch.chdir(tmp_path)  # somewhere else than the manifest's folder
    result = prepare(Path("study/manifest.csv"), Path("out.h5"))
    assert (result.n_volumes, result.n_slices) == (2, 6)
    assert read_info(tmp_path / "out.h5").subjects.tolist() == ["a"] * 3 + ["b"] * 3


def test_manifest_columns_any_order_and_case(tmp_path):
    save(tmp_path / "a.nii.gz", blob())
    manifest = write_manifest(
        tmp_path / "m.csv", ["s01, cn ,a.nii.gz"], header="Subject,Label,PATH"
    )
    rows = read_manifest(manifest)
    assert [(r.line, r.path, r.label, r.subject) for r in rows] == [
        (2, tmp_path / "a.nii.gz", "cn", "s01")
    ]


def test_progress_bar(tmp_path, capsys):
    save(tmp_path / "a.nii.gz", blob())
    manifest = write_manifest(tmp_path / "m.csv", ["a.nii.gz,x"], header="path,label")
    prepare(manifest, tmp_path / "o1.h5", progress=True)
    assert "prepare" in capsys.readouterr().err
    prepare(manifest, tmp_path / "o2.h5", progress=False)
    assert capsys.readouterr().err == ""


# --- geometry and intensity equivalences ----------------------------------------------------


def test_las_volume_gives_the_same_slices_as_its_ras_twin(tmp_path):
    data = blob()
    ras = only_image(tmp_path, "ras.nii.gz", data, np.eye(4))
    las_affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    las_affine[0, 3] = SHAPE[0] - 1  # same world positions, x axis stored right to left
    las = only_image(tmp_path, "las.nii.gz", np.ascontiguousarray(data[::-1]), las_affine)
    np.testing.assert_allclose(las, ras, atol=1e-6)
    # Sanity: without reorientation the images would be mirrored, which the blob makes visible.
    assert not np.allclose(ras, ras[..., ::-1], atol=1e-2)


@pytest.mark.parametrize("codes", [("P", "I", "L"), ("S", "L", "A")])
def test_permuted_orientation_gives_the_same_slices(tmp_path, codes):
    data = blob()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    ras = only_image(tmp_path, "ras.nii.gz", data, affine, axis="axial")
    img = nib.Nifti1Image(data, affine)
    ornt = nib.orientations.ornt_transform(
        nib.io_orientation(affine), nib.orientations.axcodes2ornt(codes)
    )
    other = img.as_reoriented(ornt)
    assert nib.aff2axcodes(other.affine) == codes
    got = only_image(
        tmp_path, "other.nii.gz", np.asarray(other.dataobj), other.affine, axis="axial"
    )
    np.testing.assert_allclose(got, ras, atol=1e-6)


def test_scaled_int16_matches_its_float_twin(tmp_path):
    raw = np.round(blob() / 2).astype(np.int16)
    slope, inter = -1.5, 2000.0  # a negative slope inverts contrast if scaling were ignored
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, tmp_path / "int.nii.gz")
    on_disk = nib.load(tmp_path / "int.nii.gz")
    assert on_disk.get_data_dtype() == np.int16
    assert (on_disk.dataobj.slope, on_disk.dataobj.inter) == (slope, inter)
    manifest = write_manifest(tmp_path / "int.csv", ["int.nii.gz,a"], header="path,label")
    prepare(manifest, tmp_path / "int.h5")
    scaled = read_images(tmp_path / "int.h5")

    twin = only_image(tmp_path, "float.nii.gz", raw.astype(np.float32) * slope + inter)
    np.testing.assert_allclose(scaled, twin, atol=1e-5)
    unscaled = only_image(tmp_path, "raw.nii.gz", raw.astype(np.float32))
    assert not np.allclose(scaled, unscaled, atol=0.1)


def test_4d_with_one_volume_is_accepted(tmp_path):
    data = blob()
    three_d = only_image(tmp_path, "three.nii.gz", data)
    four_d = only_image(tmp_path, "four.nii.gz", data[..., None])
    np.testing.assert_allclose(four_d, three_d, atol=0)


def test_anisotropic_voxels_keep_the_physical_aspect(tmp_path):
    data = blob()  # 20 x 24 x 18 voxels of 1 x 1 x 2 mm: a coronal slice is 20 mm by 36 mm
    aniso = only_image(tmp_path, "aniso.nii.gz", data, np.diag([1.0, 1.0, 2.0, 1.0]), size=32)
    # Rows span the 36 mm height; the 20 mm width takes round(32 * 20 / 36) = 18 columns,
    # centred with 7 columns of zero padding on each side.
    assert np.all(aniso[..., :7] == 0) and np.all(aniso[..., 25:] == 0)
    assert np.all(aniso[..., 7].max(axis=-1) > 0.1) and np.all(aniso[..., 24].max(axis=-1) > 0.1)
    assert np.all(aniso[..., 0, 7:25].max(axis=-1) > 0)  # full height used
    # The same object sampled on an isotropic 1 mm grid gives nearly the same images.
    iso = only_image(tmp_path, "iso.nii.gz", np.repeat(data, 2, axis=2), np.eye(4), size=32)
    assert np.all(iso[..., :7] == 0) and np.all(iso[..., 25:] == 0)
    np.testing.assert_allclose(aniso, iso, atol=0.05)


def test_load_volume_returns_canonical_data_and_zooms(tmp_path):
    affine = np.diag([-0.8, 1.2, 3.0, 1.0])
    save(tmp_path / "v.nii", blob(), affine)
    data, zooms, nan_voxels = load_volume(tmp_path / "v.nii")
    assert nan_voxels == 0 and data.dtype == np.float32 and data.shape == SHAPE
    np.testing.assert_allclose(zooms, [0.8, 1.2, 3.0], rtol=1e-6)
    np.testing.assert_array_equal(data, blob()[::-1])


def test_nan_as_background_zeroes_a_masked_volume_and_counts_it(tmp_path):
    """A masked volume (NaN outside the mask) gives the images of the same volume with 0 there."""
    masked = np.where(blob() > 700, blob(), np.nan).astype(np.float32)
    zeroed = np.nan_to_num(masked, nan=0.0)
    save(tmp_path / "masked.nii.gz", masked)
    save(tmp_path / "zeroed.nii.gz", zeroed)
    manifest = write_manifest(tmp_path / "m.csv", ["masked.nii.gz,x"], "path,label")
    with pytest.raises(ManifestError, match="--nan-as-background"):
        prepare(manifest, tmp_path / "refused.h5")
    assert not (tmp_path / "refused.h5").exists()
    out = prepare(manifest, tmp_path / "out.h5", nan_as_background=True).out
    reference = prepare(write_manifest(tmp_path / "z.csv", ["zeroed.nii.gz,x"], "path,label"), tmp_path / "z.h5").out
    np.testing.assert_array_equal(read_images(out), read_images(reference))
    assert read_info(out).provenance["nan_voxels_set_to_background"] == int(np.isnan(masked).sum()) > 0
    assert "nan_voxels_set_to_background" not in read_info(reference).provenance


# --- errors ---------------------------------------------------------------------------------


def _truncated(path: Path) -> None:
    save(path, blob())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _corrupted(path: Path) -> None:
    save(path, blob())
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(64)  # damage the deflate stream, keep the length
    path.write_bytes(bytes(raw))


BAD_ROWS = {
    # name: (file name, how to make the file or None, label, reason expected in the message)
    "missing file": ("missing.nii.gz", None, "x", "file not found"),
    "truncated gz": ("cut.nii.gz", _truncated, "x", "truncated or corrupt"),
    "corrupt gz": ("bad.nii.gz", _corrupted, "x", "truncated or corrupt"),
    "truncated nii": ("cut.nii", _truncated, "x", "truncated or corrupt"),
    "text as nii": ("text.nii", lambda p: p.write_text("not an image\n" * 40), "x", "NIfTI"),
    "nan volume": (
        "nan.nii.gz",
        lambda p: save(p, np.where(blob() > 700, np.nan, blob()).astype(np.float32)),
        "x",
        "NaN voxels (if they mark the outside of a mask, --nan-as-background",
    ),
    "inf volume": (
        "inf.nii",
        lambda p: save(p, np.where(blob() > 700, np.inf, blob()).astype(np.float32)),
        "x",
        "Inf voxels",
    ),
    "2d image": ("flat.nii.gz", lambda p: save(p, blob()[:, :, 0]), "x", "2D image"),
    "4d series": (
        "series.nii.gz",
        lambda p: save(p, np.stack([blob(seed=s) for s in range(3)], axis=-1)),
        "x",
        "3 volumes",
    ),
    "constant volume": (
        "const.nii.gz",
        lambda p: save(p, np.full(SHAPE, 7, np.float32)),
        "x",
        "constant volume",
    ),
    "too few slices": (
        "thin.nii.gz",
        lambda p: save(p, blob((20, 2, 18))),
        "x",
        "fewer than slices_per_volume",
    ),
    "empty label": ("unlabelled.nii.gz", lambda p: save(p, blob()), "", "empty label"),
    "not nifti name": ("scan.mgz", lambda p: p.write_bytes(b"x"), "x", "not a NIfTI file name"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_stops_the_run_and_leaves_nothing(tmp_path, case):
    name, make, label, reason = BAD_ROWS[case]
    save(tmp_path / "good.nii.gz", blob())
    if make is not None:
        make(tmp_path / name)
    # The bad row comes after a good one, so data-level failures happen mid-write.
    manifest = write_manifest(
        tmp_path / "m.csv", ["good.nii.gz,x", f"{name},{label}"], "path,label"
    )
    out = tmp_path / "out" / "data.h5"
    with pytest.raises(ManifestError) as excinfo:
        prepare(manifest, out)
    message = str(excinfo.value)
    assert "m.csv line 3" in message and name in message and reason in message, message
    assert_nothing_written(out)


def test_empty_path_and_duplicate_rows(tmp_path):
    save(tmp_path / "a.nii.gz", blob())
    out = tmp_path / "out" / "data.h5"
    manifest = write_manifest(tmp_path / "m.csv", ["a.nii.gz,x", " ,x"], "path,label")
    with pytest.raises(ManifestError, match=r"m\.csv line 3: empty path"):
        prepare(manifest, out)
    assert_nothing_written(out)
    # The same file twice, once relative and once absolute, is a duplicate.
    manifest = write_manifest(
        tmp_path / "m.csv", ["a.nii.gz,x", f"{tmp_path / 'a.nii.gz'},y"], "path,label"
    )
    with pytest.raises(
        ManifestError, match=r"m\.csv line 3: .*a\.nii\.gz: duplicate row: same file as line 2"
    ):
        prepare(manifest, out)
    assert_nothing_written(out)


def test_cheap_checks_come_before_any_volume_is_read(tmp_path):
    """A missing file at the end is reported even though an earlier file is truncated."""
    _truncated(tmp_path / "cut.nii.gz")
    manifest = write_manifest(tmp_path / "m.csv", ["cut.nii.gz,x", "gone.nii,x"], "path,label")
    with pytest.raises(ManifestError, match=r"line 3: .*gone\.nii: file not found"):
        prepare(manifest, tmp_path / "out" / "data.h5")
    assert_nothing_written(tmp_path / "out" / "data.h5")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "manifest file not found"),
        ("", "manifest is empty"),
        ("path,label\n", "no data rows"),
        ("path,label\n\n \n", "no data rows"),
        ("path,subject\na.nii.gz,s\n", "missing required column(s) ['label']"),
        ("file,label\na.nii.gz,x\n", "missing required column(s) ['path']"),
        ("path,label,age\na.nii.gz,x,70\n", "unknown column(s) ['age']"),
        ("path,label,label\na.nii.gz,x,y\n", "duplicated column(s) ['label']"),
    ],
)
def test_bad_manifest(tmp_path, content, reason):
    save(tmp_path / "a.nii.gz", blob())
    manifest = tmp_path / "m.csv"
    if content is not None:
        manifest.write_text(content)
    out = tmp_path / "out" / "data.h5"
    with pytest.raises(ManifestError) as excinfo:
        prepare(manifest, out)
    assert "m.csv" in str(excinfo.value) and reason in str(excinfo.value), str(excinfo.value)
    assert_nothing_written(out)


def test_wrong_number_of_fields(tmp_path):
    save(tmp_path / "a.nii.gz", blob())
    manifest = write_manifest(tmp_path / "m.csv", ["a.nii.gz,x,s,extra"])
    with pytest.raises(ManifestError, match=r"line 2: a\.nii\.gz: has 4 fields, expected 3"):
        prepare(manifest, tmp_path / "out.h5")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "size must be an integer >= 1, but is: 0"),
        ({"slices_per_volume": 2.5}, "slices_per_volume must be an integer >= 1, but is: 2.5"),
        (
            {"axis": "oblique"},
            "axis must be one of ['sagittal', 'coronal', 'axial'], but is: 'oblique'",
        ),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    save(tmp_path / "a.nii.gz", blob())
    manifest = write_manifest(tmp_path / "m.csv", ["a.nii.gz,x"], "path,label")
    with pytest.raises(ConfigError) as excinfo:
        prepare(manifest, tmp_path / "out.h5", **kwargs)
    assert str(excinfo.value) == message


# --- skip_bad -------------------------------------------------------------------------------


def test_skip_bad_skips_and_reports(tmp_path):
    save(tmp_path / "a.nii.gz", blob(seed=1))
    save(tmp_path / "b.nii.gz", blob(seed=2))
    _truncated(tmp_path / "cut.nii.gz")  # found while streaming (data level)
    save(tmp_path / "nan.nii", np.full(SHAPE, np.nan, np.float32))  # data level
    save(tmp_path / "flat.nii", blob()[:, :, 0])  # header level
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            "a.nii.gz,x",
            "cut.nii.gz,y",
            "gone.nii,y",
            "flat.nii,z",
            "b.nii.gz,y",
            "nan.nii,x",
            "a.nii.gz,x",
        ],
        "path,label",
    )
    out = tmp_path / "out" / "data.h5"
    result = prepare(manifest, out, skip_bad=True)

    assert (result.n_volumes, result.n_slices) == (2, 6)
    assert result.class_names == ["x", "y"]  # "z" only came from a row rejected up front
    assert [(s["row"], Path(s["path"]).name) for s in result.skipped] == [
        (3, "cut.nii.gz"),
        (4, "gone.nii"),
        (5, "flat.nii"),
        (7, "nan.nii"),
        (8, "a.nii.gz"),
    ]
    reasons = {s["row"]: s["reason"] for s in result.skipped}
    assert reasons[4] == "file not found" and "duplicate" in reasons[8]
    assert "2D image" in reasons[5] and "truncated" in reasons[3] and "NaN voxels" in reasons[7]
    info = read_info(out)
    assert info.provenance["skipped"] == result.skipped
    assert info.provenance["n_volumes"] == 2
    assert info.subjects.tolist() == ["a"] * 3 + ["b"] * 3
    assert os.listdir(out.parent) == ["data.h5"]


def test_skip_bad_warns_about_a_class_left_empty(tmp_path):
    save(tmp_path / "a.nii.gz", blob())
    _truncated(tmp_path / "cut.nii.gz")  # the only "y" volume, rejected while streaming
    manifest = write_manifest(tmp_path / "m.csv", ["a.nii.gz,x", "cut.nii.gz,y"], "path,label")
    with pytest.warns(UserWarning, match=r"\['y'\] have no images"):
        result = prepare(manifest, tmp_path / "out.h5", skip_bad=True)
    assert result.class_names == ["x", "y"] and read_info(tmp_path / "out.h5").class_counts() == {
        "x": 3,
        "y": 0,
    }


@pytest.mark.parametrize("late", [False, True])
def test_skip_bad_with_every_row_bad_is_an_error(tmp_path, late):
    if late:  # every file fails only when its data are read
        _truncated(tmp_path / "a.nii.gz")
        save(tmp_path / "b.nii.gz", np.zeros(SHAPE, np.float32))
    manifest = write_manifest(tmp_path / "m.csv", ["a.nii.gz,x", "b.nii.gz,y"], "path,label")
    out = tmp_path / "out" / "data.h5"
    with pytest.raises(ManifestError, match=r"every row is bad \(2 skipped\)") as excinfo:
        prepare(manifest, out, skip_bad=True)
    assert "line 2" in str(excinfo.value) and "line 3" in str(excinfo.value)
    assert_nothing_written(out)
