"""Deterministic demo datasets simulated from the MNI152 ICBM 2009a template that nilearn ships.

``augflow`` needs data to be tried on without downloading anything. This module simulates coronal
brain slices of many "subjects" imaged on several MRI scanners (task ``scanner``) or with several
MRI and PET modalities (task ``modality``), with class sizes proportional to those of the MAGIC-Flow
paper.

Tissue model
------------
The grey-matter (GM) and white-matter (WM) probability maps of the ICBM 2009a symmetric template
(1 mm, RAS, 197 x 233 x 189) give partial-volume fractions; inside the brain mask of the
(brain-extracted) T1 template, cerebrospinal fluid is ``CSF = 1 - GM - WM``, so the three fractions
sum to one. A linear mix ``GM * 0.66 + WM * 0.87 + CSF * 0.27`` reproduces the template T1 itself to
0.02 RMS, so every contrast below is such a mix of tissue fractions (MRI) or of tissue uptakes
(PET).

The coronal slab ``y = 116 + offset`` (the volume centre, through thalamus, lateral and third
ventricles; ``offset`` in -5..5 mm) is cut into 2-D slices, shown superior up and in neurological
convention (the patient's left on the image left, as ``augflow prepare`` shows slices), padded
from 197 x 189 to 197 x 197 mm and resampled with an anti-aliasing filter to a working grid of twice the output size.

Subjects
--------
Each subject has its own anatomy, shared by all its slices (``SLICES_PER_SUBJECT`` distinct
offsets):

* ventricular enlargement: CSF replaces tissue within ``r ~ U(0, 4)`` mm of the lateral and third
  ventricles (atrophy ex vacuo; GM and WM shrink in proportion, fractions still sum to one);
* a global affine map: isotropic scale ``exp(N(0, 0.05))``, anisotropy ``exp(N(0, 0.03))``, in-plane
  rotation ``N(0, 3)`` degrees, translation ``N(0, 2)`` mm about the brain centre;
* a smooth random displacement field: Gaussian values on a 5 x 5 control grid (SD 2.5 mm per
  component) interpolated by cubic splines over the slice.

The deformed tissue fractions are block-averaged by 2 x 2 to the output grid, where acquisition is
simulated.

Scanner task (7 MRI scanners, T1-weighted)
------------------------------------------
Classes are defined by acquisition, not anatomy: every subject of every scanner is drawn from the
same anatomical distribution. The chain for a subject with signature ``s`` is

1. tissue contrast ``I = GM * s.gm + WM * s.wm + CSF * s.csf`` (WM = 1);
2. resolution: the k-space of the output grid is truncated to a fraction ``s.k_rows``
   (superior-inferior) and ``s.k_cols`` (left-right) of its Nyquist band, with a box window (Gibbs
   ringing) or a Hann window (smooth blur). Resolution is relative to the output grid so that it
   stays visible at 32-128 px;
3. multiplicative bias field
   ``exp(s.bias_lin * (cos(a) X + sin(a) Z) + s.bias_quad * (X^2 + Z^2))``, with ``X, Z`` in
   [-1, 1] (``Z`` superior) and ``a = s.bias_angle``: negative ``bias_quad`` is the centre
   brightening of 3 T transmit fields, positive the periphery brightening of dense receive arrays;
4. Rician noise: magnitude of ``I + N(0, 1/snr) + i N(0, 1/snr)``;
5. skull stripping (background set to 0), robust normalisation (99.5th percentile of brain
   pixels -> 1, clip to [0, 1]) and an intensity non-linearity ``x ** s.gamma``.

Each subject jitters its scanner's parameters (site and session variation): contrasts by 3 % (SD),
``snr`` by 12 % (log-normal), bias amplitudes by 25 % and the bias angle by 10 degrees, k-space
fractions by 0.02 and ``gamma`` by 3 %.

================  =====  ====  ====  ===  ========  =====  =====  ======  ======  ======  =====
scanner           csf    gm    wm    snr  bias_lin  angle  quad   k_rows  k_cols  window  gamma
================  =====  ====  ====  ===  ========  =====  =====  ======  ======  ======  =====
Gyroscan Intera   0.36   0.72  1.0   20   0.12      90     0.00   0.62    0.80    box     1.00
Intera            0.28   0.64  1.0   28   0.10      45     -0.05  0.80    0.85    box     0.95
GE IOP            0.24   0.58  1.0   24   0.18      0      0.05   0.70    0.70    hann    1.20
TrioTim PPMI      0.18   0.52  1.0   35   0.05      90     -0.15  0.92    0.92    box     0.90
TrioTim SALD      0.21   0.55  1.0   32   0.06      80     -0.12  0.88    0.92    box     0.93
Prisma            0.15   0.48  1.0   50   0.04      90     0.10   1.00    1.00    box     0.95
Prisma Fit        0.15   0.50  1.0   45   0.04      90     0.13   1.00    1.00    box     0.97
================  =====  ====  ====  ===  ========  =====  =====  ======  ======  ======  =====

(The authoritative values are :data:`SCANNERS`; this table documents them.) Pairs of a family are
close on purpose (Prisma / Prisma Fit, TrioTim PPMI / TrioTim SALD), so the task is learnable but
not trivial.

Modality task (3 MRI and 3 PET contrasts)
-----------------------------------------
* ``T1``: the scanner chain above, with the signature of a random scanner of the scanner task.
* ``T2``: CSF bright (1.0), GM 0.62, WM 0.45; generic MRI acquisition (SNR 15-40, random bias,
  k-space 0.75-1.0, gamma 0.85-1.15).
* ``FLAIR``: CSF suppressed (0.06), GM 0.85, WM 0.64 (WM slightly darker than GM); generic MRI
  acquisition; a third of the subjects have periventricular hyperintensities (rims of 1.0 within
  2-5 mm of the ventricles, as in small-vessel disease).
* ``FDG-PET``: glucose uptake GM 1.0, WM 0.30, CSF 0.04, modulated in GM by a smooth random field
  (+-15 %, regional hypometabolism).
* ``amyloid-PET``: nonspecific white-matter binding (WM 0.85); cortical binding GM 0.35 for
  amyloid-negative subjects and 0.65-1.0 for the 40 % amyloid-positive ones; CSF 0.05.
* ``tau-PET``: low background (GM 0.25, WM 0.20, CSF 0.03) plus patchy cortical uptake: a smooth
  random field (control grid 7 x 7) thresholded and exponentiated, masked by GM, in 60 % of the
  subjects; off-target binding of the choroid plexus (0.1-0.3 added to the CSF of the central,
  ventricular region).

T2 and FLAIR are skull-stripped and normalised as in the scanner chain. PET images are blurred to a
scanner resolution of FWHM ``U(6, 8)`` mm, then get Poisson counting noise (``U(150, 400)`` counts
at peak uptake per output pixel) and a light post-reconstruction smoothing (FWHM 3 mm); they are not
skull-stripped (blurred uptake spills outside the brain) and are normalised like MRI.

Determinism
-----------
Every subject draws its anatomy and acquisition from its own generator,
``numpy.random.default_rng([seed, task_id, class_index, subject_index])``, and each of its slices
draws its noise from ``default_rng([seed, task_id, class_index, subject_index, 1, offset + 5])``.
The pipeline uses only single-threaded numpy/scipy routines, so a seed gives byte-identical images
whatever the thread count, and a slice is the same whatever ``scale`` is (a class's last, partly
filled subject keeps a subset of the slices it has at a larger scale).

References:
    MAGIC-Flow, arXiv:2510.22070 (https://arxiv.org/abs/2510.22070): the class sizes of its scanner
    and modality classification sets.

    Fonov et al., Unbiased average age-appropriate atlases for pediatric studies, NeuroImage 54
    (2011); Fonov et al., Unbiased nonlinear average age-appropriate brain templates from birth to
    adulthood, NeuroImage 47 (2009) (the MNI152 ICBM 2009a template).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from augflow.atomic import check_output
from augflow.data.store import DatasetWriter
from augflow.errors import ConfigError

TASKS: dict[str, list[str]] = {
    "scanner": [
        "Gyroscan Intera",
        "Intera",
        "GE IOP",
        "TrioTim PPMI",
        "TrioTim SALD",
        "Prisma",
        "Prisma Fit",
    ],
    "modality": ["T1", "T2", "FLAIR", "FDG-PET", "amyloid-PET", "tau-PET"],
}
"""Class names of each task, in label order."""

CLASS_COUNTS: dict[str, dict[str, int]] = {
    "scanner": {
        "Gyroscan Intera": 322,
        "Intera": 185,
        "GE IOP": 74,
        "TrioTim PPMI": 41,
        "TrioTim SALD": 494,
        "Prisma": 69,
        "Prisma Fit": 167,
    },
    "modality": {
        "T1": 527,
        "T2": 535,
        "FLAIR": 526,
        "FDG-PET": 522,
        "amyloid-PET": 516,
        "tau-PET": 518,
    },
}
"""Slices per class at ``scale=1``: the classification sets of MAGIC-Flow (arXiv:2510.22070)."""

SLICES_PER_SUBJECT = 4
"""Coronal slices per subject (the last subject of a class may have fewer)."""

MAX_OFFSET = 5
"""Slices are taken at offsets -MAX_OFFSET..MAX_OFFSET mm from the centre slice."""

CENTRE_Y = 116
"""Template index of the centre coronal slice (the middle of its 233 mm antero-posterior extent)."""

MIN_SIZE, MAX_SIZE = 16, 512
MAX_SCALE = 100.0

TEMPLATE_NAME = "MNI152 ICBM 2009a (nilearn)"
_TEMPLATE_FILES = {
    k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")
}
_FOV_MM = 197  # the padded square field of view, 1 mm pixels


@dataclass(frozen=True)
class ScannerSignature:
    """The acquisition of one MRI scanner (T1-weighted), as simulated; see the module docstring.

    Arguments:
        csf: CSF intensity relative to white matter.
        gm: Grey-matter intensity relative to white matter.
        wm: White-matter intensity (the reference, 1.0).
        snr: White-matter signal over the noise SD of each quadrature channel (Rician noise).
        bias_lin: Amplitude of the linear part of the log bias field.
        bias_angle: Direction of the linear part, degrees (0 = left-right, 90 = superior).
        bias_quad: Amplitude of the radial part of the log bias field (< 0 centre-bright).
        k_rows: Fraction of the superior-inferior k-space band kept (resolution).
        k_cols: Fraction of the left-right k-space band kept.
        window: "box" (Gibbs ringing) or "hann" (smooth blur) k-space window.
        gamma: Intensity non-linearity applied to the normalised image.
    """

    csf: float
    gm: float
    wm: float
    snr: float
    bias_lin: float
    bias_angle: float
    bias_quad: float
    k_rows: float
    k_cols: float
    window: str
    gamma: float


SCANNERS: dict[str, ScannerSignature] = {
    "Gyroscan Intera": ScannerSignature(
        0.36, 0.72, 1.0, 20, 0.12, 90, 0.00, 0.62, 0.80, "box", 1.00
    ),
    "Intera": ScannerSignature(0.28, 0.64, 1.0, 28, 0.10, 45, -0.05, 0.80, 0.85, "box", 0.95),
    "GE IOP": ScannerSignature(0.24, 0.58, 1.0, 24, 0.18, 0, 0.05, 0.70, 0.70, "hann", 1.20),
    "TrioTim PPMI": ScannerSignature(0.18, 0.52, 1.0, 35, 0.05, 90, -0.15, 0.92, 0.92, "box", 0.90),
    "TrioTim SALD": ScannerSignature(0.21, 0.55, 1.0, 32, 0.06, 80, -0.12, 0.88, 0.92, "box", 0.93),
    "Prisma": ScannerSignature(0.15, 0.48, 1.0, 50, 0.04, 90, 0.10, 1.00, 1.00, "box", 0.95),
    "Prisma Fit": ScannerSignature(0.15, 0.50, 1.0, 45, 0.04, 90, 0.13, 1.00, 1.00, "box", 0.97),
}
"""Nominal signature of each scanner; each subject jitters it (see :func:`jitter_signature`)."""

MODALITIES: dict[str, dict] = {
    "T1": {"kind": "mri", "contrast": "signature of a random scanner of the scanner task"},
    "T2": {"kind": "mri", "csf": 1.0, "gm": 0.62, "wm": 0.45},
    "FLAIR": {"kind": "mri", "csf": 0.06, "gm": 0.85, "wm": 0.64, "p_lesions": 1 / 3},
    "FDG-PET": {"kind": "pet", "csf": 0.04, "gm": 1.0, "wm": 0.30, "gm_field": 0.15},
    "amyloid-PET": {
        "kind": "pet",
        "csf": 0.05,
        "gm_negative": 0.35,
        "gm_positive": [0.65, 1.0],
        "wm": 0.85,
        "p_positive": 0.4,
    },
    "tau-PET": {
        "kind": "pet",
        "csf": 0.03,
        "gm": 0.25,
        "wm": 0.20,
        "p_positive": 0.6,
        "choroid_plexus": [0.1, 0.3],
    },
}
"""Contrast of each modality (documentation and provenance; ``_render_modality`` uses it)."""

PET_FWHM_MM = (6.0, 8.0)
PET_COUNTS = (150.0, 400.0)
PET_POST_FWHM_MM = 3.0


def class_counts(task: str, scale: float = 1.0) -> dict[str, int]:
    """Slices per class of a task at a scale: ``round(count * scale)``, at least 1.

    Arguments:
        task: "scanner" or "modality".
        scale: Multiplier of the paper's class sizes, in (0, 100].

    Returns:
        Class name -> number of slices, in label order.

    Raises:
        ConfigError: for an unknown task or a scale out of range.
    """
    _check_task(task)
    _check_scale(scale)
    return {
        name: max(1, int(math.floor(n * scale + 0.5))) for name, n in CLASS_COUNTS[task].items()
    }


def template_dir() -> Path:
    """The folder of nilearn's package data that holds the MNI152 ICBM 2009a files."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


def template_slices(key: str, size: int) -> np.ndarray:
    """The 11 central coronal slices of one MNI152 template volume, as the built-in data frame them.

    Superior up, neurological, a 197 mm square field of view, resampled with anti-aliasing to ``size`` pixels.

    Arguments:
        key: The volume, ``"t1"``, ``"gm"`` or ``"wm"``.
        size: The output side in pixels.

    Returns:
        ``(11, size, size)`` float64: the template values / 255 (T1 intensities, or tissue fractions).

    Raises:
        ConfigError: If the template file is missing.
    """
    import nibabel as nib

    path = template_dir() / _TEMPLATE_FILES[key]
    if not path.is_file():
        raise ConfigError(f"the template file {path} is missing; reinstall nilearn (>= 0.10)")
    slab = np.asarray(nib.load(path).dataobj[:, CENTRE_Y - MAX_OFFSET:CENTRE_Y + MAX_OFFSET + 1, :], np.float64)
    return _to_grid(slab / 255.0, size)


def generate_demo_data(
    task: str,
    out: str | os.PathLike,
    size: int = 64,
    seed: int = 0,
    scale: float = 1.0,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Simulate a demo dataset of coronal brain slices and write it as an augflow HDF5 file.

    Arguments:
        task: "scanner" (7 T1-weighted MRI scanners, 1352 slices at scale 1) or "modality" (T1, T2,
            FLAIR, FDG-, amyloid- and tau-PET, 3144 slices at scale 1).
        out: The file to write (atomically: it appears only when complete).
        size: Output images are (1, size, size), in [MIN_SIZE, MAX_SIZE] = [16, 512].
        seed: Non-negative integer; the same seed gives byte-identical images.
        scale: Multiplier of the class sizes of MAGIC-Flow (each class keeps at least one slice).
        progress: Show a progress bar over subjects.
        overwrite: Replace ``out`` if it exists.

    Returns:
        The path written.

    Raises:
        ConfigError: for an unknown task or a size, seed or scale out of range, or an existing ``out`` without
            ``overwrite``.

    References:
        MAGIC-Flow, arXiv:2510.22070 (class sizes).
    """
    _check_task(task)
    size = _check_size(size)
    seed = _check_seed(seed)
    counts = class_counts(task, scale)
    check_output(out, overwrite)
    plan = [  # (class index, subject index, number of slices)
        (c, j, min(SLICES_PER_SUBJECT, n - j * SLICES_PER_SUBJECT))
        for c, n in enumerate(counts.values())
        for j in range(-(-n // SLICES_PER_SUBJECT))
    ]
    provenance = {
        "generator": "augflow.data.phantom",
        "task": task,
        "seed": seed,
        "size": size,
        "scale": float(scale),
        "template": TEMPLATE_NAME,
        "template_files": sorted(_TEMPLATE_FILES.values()),
        "centre_slice_y": CENTRE_Y,
        "slice_offsets_mm": [-MAX_OFFSET, MAX_OFFSET],
        "slices_per_subject": SLICES_PER_SUBJECT,
        "orientation": "coronal, superior up, neurological (patient left on image left)",
        "class_counts": counts,
        "class_counts_reference": "MAGIC-Flow, arXiv:2510.22070",
    }
    # the T1 class of the modality task uses the scanner signatures too
    provenance["scanners"] = {name: asdict(sig) for name, sig in SCANNERS.items()}
    provenance["jitter"] = _JITTER
    if task == "modality":
        provenance["modalities"] = MODALITIES
        provenance["pet"] = {
            "fwhm_mm": list(PET_FWHM_MM),
            "counts_at_peak": list(PET_COUNTS),
            "post_fwhm_mm": PET_POST_FWHM_MM,
        }
    names = TASKS[task]
    with DatasetWriter(out, (1, size, size), names, source="real", provenance=provenance) as writer:
        for c, j, n in tqdm(plan, desc=f"phantom {task}", unit="subject", disable=not progress):
            images, offsets = simulate_subject(task, c, j, seed=seed, size=size, num_slices=n)
            subject = f"{task}-{re.sub(r'[^A-Za-z0-9]', '', names[c])}-{j:04d}"
            writer.append(images, np.full(n, c), np.full(n, subject, dtype=object), offsets)
    return Path(out)


def simulate_subject(
    task: str,
    class_index: int,
    subject_index: int,
    seed: int = 0,
    size: int = 64,
    num_slices: int = SLICES_PER_SUBJECT,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate the slices of one subject (what :func:`generate_demo_data` writes for it).

    Arguments:
        task: "scanner" or "modality".
        class_index: Index of the class in ``TASKS[task]``.
        subject_index: Index of the subject within its class (non-negative).
        seed: Dataset seed.
        size: Output image size.
        num_slices: Number of distinct slice offsets, 1..11.

    Returns:
        images float32 (num_slices, 1, size, size) in [0, 1] and offsets int64 (num_slices,) in
        -5..5 (sorted).

    Raises:
        ConfigError: for an argument out of range.
    """
    _check_task(task)
    size = _check_size(size)
    seed = _check_seed(seed)
    if not 0 <= class_index < len(TASKS[task]):
        raise ConfigError(f"class_index must be in [0, {len(TASKS[task])}), but is: {class_index}")
    if subject_index < 0:
        raise ConfigError(f"subject_index must be >= 0, but is: {subject_index}")
    if not 1 <= num_slices <= 2 * MAX_OFFSET + 1:
        raise ConfigError(f"num_slices must be in [1, {2 * MAX_OFFSET + 1}], but is: {num_slices}")
    task_id = list(TASKS).index(task)
    rng = np.random.default_rng([seed, task_id, class_index, subject_index])
    # a permutation draws the same numbers whatever num_slices is, so fewer slices are a subset
    offsets = np.sort(rng.permutation(2 * MAX_OFFSET + 1)[:num_slices]) - MAX_OFFSET
    # one noise generator per slice: a slice is the same whatever else is simulated
    noise = [
        np.random.default_rng([seed, task_id, class_index, subject_index, 1, int(o) + MAX_OFFSET])
        for o in offsets
    ]
    tissue = _subject_tissue(rng, _template(size), offsets + MAX_OFFSET)  # (n, 3, size, size)
    name = TASKS[task][class_index]
    if task == "scanner":
        images = _acquire_mri(tissue, jitter_signature(SCANNERS[name], rng), noise, size)
    else:
        images = _render_modality(name, tissue, rng, noise, size)
    return images[:, None].astype(np.float32), offsets.astype(np.int64)


# ---------------------------------------------------------------------------------------- template


@dataclass(frozen=True)
class _Template:
    """Template tissue fractions at the working grid (2 * size), one row per offset -5..5."""

    tissue: np.ndarray  # (11, 3, W, W) GM, WM, CSF fractions, zero outside the brain
    vent_dist: np.ndarray  # (11, W, W) distance (mm) to the ventricles' core
    centre: np.ndarray  # (2,) brain centre (row, col) in working-grid pixels
    pixel_mm: float  # working-grid pixel size


@lru_cache(maxsize=4)
def _template(size: int) -> _Template:
    import nibabel as nib

    folder = template_dir()
    vol = {}
    for key, name in _TEMPLATE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"the template file {path} is missing; reinstall nilearn (>= 0.10)")
        sl = slice(CENTRE_Y - MAX_OFFSET, CENTRE_Y + MAX_OFFSET + 1)
        vol[key] = (
            np.asarray(nib.load(path).dataobj[:, sl, :], dtype=np.float64) / 255.0
        )  # (x, 11, z)
    brain = vol["t1"] > 0
    gm, wm = vol["gm"] * brain, vol["wm"] * brain
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    dist = np.stack([_ventricle_distance(csf[:, i], brain[:, i]) for i in range(csf.shape[1])], 1)
    work = 2 * size
    tissue = np.stack([_to_grid(a, work) for a in (gm, wm, csf)], 1)  # (11, 3, W, W)
    tissue = np.clip(tissue, 0.0, 1.0)
    vent_dist = _to_grid(np.minimum(dist, 50.0), work, prefilter=False)
    rows, cols = np.nonzero(tissue[MAX_OFFSET].sum(0) > 0.5)
    centre = np.array([rows.mean(), cols.mean()])
    return _Template(tissue, vent_dist, centre, _FOV_MM / work)


def _ventricle_distance(csf: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Distance (mm) of each voxel of a coronal slice (x, z) to the lateral and third ventricles."""
    core = (csf > 0.5) & ndi.binary_erosion(brain, iterations=10)  # deep CSF, cut from the surface
    labels, n = ndi.label(core)
    keep = np.zeros_like(core)
    for i in range(1, n + 1):
        xs, zs = np.nonzero(labels == i)
        # ventricles sit near the midline (x = 98) between z = 60 and 115; the interhemispheric
        # fissure above them and deep sulci lateral to them are excluded
        if abs(xs.mean() - 98) < 22 and 60 < zs.mean() < 115:
            keep |= labels == i
    if not keep.any():
        return np.full(csf.shape, 50.0)
    return ndi.distance_transform_edt(~keep)


def _to_grid(vol: np.ndarray, work: int, prefilter: bool = True) -> np.ndarray:
    """(x, n, z) template slices -> (n, work, work): superior up, neurological, padded, resized."""
    # (n, z, x) with superior first and the patient's left on the image left, as `augflow prepare` shows it.
    slices = np.transpose(vol, (1, 2, 0))[:, ::-1, :]
    pad = _FOV_MM - slices.shape[1]
    slices = np.pad(slices, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)))
    factor = work / _FOV_MM
    if prefilter and factor < 1:
        sigma = (
            math.sqrt(max(1 / factor**2 - 1, 0)) / 2
        )  # the extra blur a pixel of the new grid needs
        slices = ndi.gaussian_filter(slices, (0, sigma, sigma), mode="constant")
    return np.stack(
        [ndi.zoom(s, factor, order=1, grid_mode=True, mode="grid-constant") for s in slices]
    )


# ----------------------------------------------------------------------------------------- anatomy


def _smooth_field(rng: np.random.Generator, grid: int, shape: tuple[int, int]) -> np.ndarray:
    """A smooth random field: N(0, 1) values on a grid x grid lattice, cubic-spline interpolated."""
    coarse = rng.standard_normal((grid, grid))
    rows = np.linspace(0, grid - 1, shape[0])
    cols = np.linspace(0, grid - 1, shape[1])
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return ndi.map_coordinates(coarse, [rr, cc], order=3, mode="nearest")


def _subject_tissue(rng: np.random.Generator, tmpl: _Template, rows: np.ndarray) -> np.ndarray:
    """Deform the template slices of one subject; return tissue fractions (n, 3, size, size)."""
    tissue = tmpl.tissue[rows]  # (n, 3, W, W)
    work = tissue.shape[-1]
    mm = tmpl.pixel_mm
    # ventricular enlargement: CSF replaces tissue within r mm of the ventricles (1-pixel soft edge)
    radius = rng.uniform(0.0, 4.0)
    vent = np.clip((radius - tmpl.vent_dist[rows]) / mm + 0.5, 0.0, 1.0)
    brain = tissue.sum(1)
    csf = np.maximum(tissue[:, 2], vent * brain)
    shrink = np.divide(
        brain - csf,
        tissue[:, 0] + tissue[:, 1],
        out=np.zeros_like(csf),
        where=tissue[:, 0] + tissue[:, 1] > 1e-6,
    )
    tissue = np.stack([tissue[:, 0] * shrink, tissue[:, 1] * shrink, csf], 1)
    # global affine map about the brain centre plus a smooth displacement (sampling coordinates)
    scale = math.exp(rng.normal(0, 0.05))
    aniso = math.exp(rng.normal(0, 0.03))
    theta = math.radians(rng.normal(0, 3.0))
    shift = rng.normal(0, 2.0, size=2) / mm
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    matrix = rot @ np.diag([scale * aniso, scale / aniso])
    disp = np.stack([_smooth_field(rng, 5, (work, work)) for _ in range(2)]) * (2.5 / mm)
    grid = np.mgrid[0:work, 0:work].astype(np.float64) - tmpl.centre[:, None, None]
    coords = np.einsum("ij,jhw->ihw", matrix, grid) + (tmpl.centre + shift)[:, None, None] + disp
    warped = np.empty_like(tissue)
    for i in range(tissue.shape[0]):
        for k in range(3):
            warped[i, k] = ndi.map_coordinates(tissue[i, k], coords, order=1, mode="constant")
    n = warped.shape[0]
    return warped.reshape(n, 3, work // 2, 2, work // 2, 2).mean((3, 5))  # (n, 3, size, size)


# --------------------------------------------------------------------------------------------- MRI

_JITTER = {
    "contrast_sd": 0.03,
    "snr_log_sd": 0.12,
    "bias_rel_sd": 0.25,
    "bias_angle_sd_deg": 10.0,
    "k_sd": 0.02,
    "gamma_log_sd": 0.03,
}


def jitter_signature(sig: ScannerSignature, rng: np.random.Generator) -> ScannerSignature:
    """A subject's own version of a scanner signature (site and session variation, see ``_JITTER``).

    Arguments:
        sig: The nominal signature.
        rng: The subject's random generator.

    Returns:
        The jittered signature.
    """
    j = _JITTER
    con = 1 + rng.normal(0, j["contrast_sd"], size=3)
    bias = 1 + rng.normal(0, j["bias_rel_sd"], size=2)
    k = rng.normal(0, j["k_sd"], size=2)
    return ScannerSignature(
        csf=sig.csf * con[0],
        gm=sig.gm * con[1],
        wm=sig.wm * con[2],
        snr=sig.snr * math.exp(rng.normal(0, j["snr_log_sd"])),
        bias_lin=sig.bias_lin * bias[0],
        bias_angle=sig.bias_angle + rng.normal(0, j["bias_angle_sd_deg"]),
        bias_quad=sig.bias_quad * bias[1],
        k_rows=float(np.clip(sig.k_rows + k[0], 0.3, 1.0)),
        k_cols=float(np.clip(sig.k_cols + k[1], 0.3, 1.0)),
        window=sig.window,
        gamma=sig.gamma * math.exp(rng.normal(0, j["gamma_log_sd"])),
    )


def _kspace_filter(size: int, k_rows: float, k_cols: float, window: str) -> np.ndarray:
    """Separable (size, size) k-space window keeping a fraction of each axis' Nyquist band."""

    def axis(frac: float) -> np.ndarray:
        f = np.abs(np.fft.fftfreq(size)) / 0.5  # 0 at DC, 1 at Nyquist
        if window == "hann":
            return np.where(f < frac, 0.5 + 0.5 * np.cos(np.pi * f / frac), 0.0)
        return (f <= frac).astype(np.float64)

    return axis(k_rows)[:, None] * axis(k_cols)[None, :]


def _bias_field(size: int, lin: float, angle_deg: float, quad: float) -> np.ndarray:
    z, x = np.meshgrid(
        np.linspace(1, -1, size), np.linspace(-1, 1, size), indexing="ij"
    )  # z superior
    a = math.radians(angle_deg)
    return np.exp(lin * (math.cos(a) * x + math.sin(a) * z) + quad * (x**2 + z**2))


def _acquire_mri(
    tissue: np.ndarray,
    sig: ScannerSignature,
    noise: list[np.random.Generator],
    size: int,
    extra: np.ndarray | None = None,
) -> np.ndarray:
    """Simulate an MRI acquisition of tissue fractions (n, 3, size, size); return (n, size, size).

    ``noise`` holds one generator per slice, for its noise only.
    """
    ideal = tissue[:, 0] * sig.gm + tissue[:, 1] * sig.wm + tissue[:, 2] * sig.csf
    if extra is not None:
        ideal = ideal + extra
    spectrum = np.fft.fft2(ideal) * _kspace_filter(size, sig.k_rows, sig.k_cols, sig.window)
    image = np.fft.ifft2(spectrum).real * _bias_field(
        size, sig.bias_lin, sig.bias_angle, sig.bias_quad
    )
    sd = 1.0 / sig.snr
    noisy = np.stack(
        [
            np.hypot(img + g.normal(0, sd, img.shape), g.normal(0, sd, img.shape))
            for img, g in zip(image, noise, strict=True)
        ]
    )
    mask = tissue.sum(1) > 0.5  # skull stripping
    out = _normalise(noisy * mask, mask)
    return out**sig.gamma


def _normalise(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per slice: divide by the 99.5th percentile inside the mask, clip to [0, 1]."""
    out = np.empty_like(images)
    for i, (img, m) in enumerate(zip(images, mask, strict=True)):
        ref = np.percentile(img[m], 99.5) if m.any() else img.max()
        out[i] = np.clip(img / ref, 0.0, 1.0) if ref > 0 else 0.0
    return out


# ---------------------------------------------------------------------------------------- modality


def _generic_mri(rng: np.random.Generator, csf: float, gm: float, wm: float) -> ScannerSignature:
    """A random MRI acquisition of a given contrast (for T2 and FLAIR)."""
    con = 1 + rng.normal(0, 0.05, size=3)
    return ScannerSignature(
        csf=csf * con[0],
        gm=gm * con[1],
        wm=wm * con[2],
        snr=rng.uniform(15, 40),
        bias_lin=rng.uniform(0, 0.15),
        bias_angle=rng.uniform(0, 360),
        bias_quad=rng.uniform(-0.15, 0.15),
        k_rows=rng.uniform(0.75, 1.0),
        k_cols=rng.uniform(0.75, 1.0),
        window=str(rng.choice(["box", "hann"])),
        gamma=rng.uniform(0.85, 1.15),
    )


def _render_modality(
    name: str,
    tissue: np.ndarray,
    rng: np.random.Generator,
    noise: list[np.random.Generator],
    size: int,
) -> np.ndarray:
    spec = MODALITIES[name]
    if name == "T1":
        scanner = list(SCANNERS)[rng.integers(len(SCANNERS))]
        return _acquire_mri(tissue, jitter_signature(SCANNERS[scanner], rng), noise, size)
    if name == "T2":
        return _acquire_mri(
            tissue, _generic_mri(rng, spec["csf"], spec["gm"], spec["wm"]), noise, size
        )
    if name == "FLAIR":
        sig = _generic_mri(rng, spec["csf"], spec["gm"], spec["wm"])
        extra = None
        if rng.random() < spec["p_lesions"]:
            extra = _periventricular_rims(tissue, rng) * (1.0 - sig.wm)
        return _acquire_mri(tissue, sig, noise, size, extra)
    gm, wm, csf = tissue[:, 0], tissue[:, 1], tissue[:, 2]
    if name == "FDG-PET":
        field = 1 + spec["gm_field"] * np.clip(_smooth_field(rng, 4, (size, size)), -2, 2) / 2
        uptake = gm * spec["gm"] * field + wm * spec["wm"] + csf * spec["csf"]
    elif name == "amyloid-PET":
        positive = rng.random() < spec["p_positive"]
        g = rng.uniform(*spec["gm_positive"]) if positive else spec["gm_negative"]
        g = g * (1 + 0.1 * _smooth_field(rng, 4, (size, size)))
        uptake = gm * g + wm * spec["wm"] * rng.uniform(0.9, 1.1) + csf * spec["csf"]
    else:  # tau-PET
        uptake = gm * spec["gm"] + wm * spec["wm"] + csf * spec["csf"]
        # off-target binding of the choroid plexus, inside the lateral ventricles
        uptake = uptake + csf * _central_box(size) * rng.uniform(*spec["choroid_plexus"])
        if rng.random() < spec["p_positive"]:
            field = _smooth_field(rng, 7, (size, size))
            patches = np.expm1(np.clip(field - rng.uniform(0.3, 1.0), 0, None) * 1.5)
            uptake = uptake + gm * np.clip(patches, 0, 3.0) * 0.5
    return _acquire_pet(uptake, rng, noise, size)


def _periventricular_rims(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fractions (n, size, size) of white matter within 2-5 mm of the CSF of the ventricles."""
    size = tissue.shape[-1]
    mm = _FOV_MM / size
    out = np.zeros(tissue.shape[:1] + tissue.shape[2:])
    width = rng.uniform(2.0, 5.0) / mm
    centre = _central_box(size)
    for i, t in enumerate(tissue):
        vent = (t[2] > 0.5) & centre
        if vent.any():
            d = ndi.distance_transform_edt(~vent)
            out[i] = np.clip(width - d + 0.5, 0, 1) * (d > 0) * t[1]
    return out


def _central_box(size: int) -> np.ndarray:
    """(size, size) mask of the region around the ventricles (rows 35-70 %, columns 35-65 %)."""
    box = np.zeros((size, size), dtype=bool)
    box[int(0.35 * size) : int(0.7 * size), int(0.35 * size) : int(0.65 * size)] = True
    return box


def _acquire_pet(
    uptake: np.ndarray, rng: np.random.Generator, noise: list[np.random.Generator], size: int
) -> np.ndarray:
    """Simulate PET images of uptake maps (n, size, size): resolution, counts, normalisation."""
    mm = _FOV_MM / size
    sigma = rng.uniform(*PET_FWHM_MM) / 2.3548 / mm
    peak_counts = rng.uniform(*PET_COUNTS)
    blurred = np.clip(ndi.gaussian_filter(uptake, (0, sigma, sigma), mode="constant"), 0, None)
    noisy = np.empty_like(blurred)
    for i, (b, g) in enumerate(zip(blurred, noise, strict=True)):
        counts = peak_counts / max(float(b.max()), 1e-6)
        noisy[i] = g.poisson(b * counts) / counts
    post = PET_POST_FWHM_MM / 2.3548 / mm
    noisy = ndi.gaussian_filter(noisy, (0, post, post), mode="constant")
    mask = blurred > 0.05 * blurred.max(axis=(1, 2), keepdims=True)
    return _normalise(noisy, mask)


# ------------------------------------------------------------------------------------------ checks


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {sorted(TASKS)}, but is: {task!r}")


def _check_size(size: int) -> int:
    if (
        isinstance(size, bool)
        or not isinstance(size, (int, np.integer))
        or not MIN_SIZE <= size <= MAX_SIZE
    ):
        raise ConfigError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], but is: {size!r}")
    return int(size)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, but is: {seed!r}")
    return int(seed)


def _check_scale(scale: float) -> None:
    ok = isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, bool)
    if not ok or not math.isfinite(scale) or not 0 < scale <= MAX_SCALE:
        raise ConfigError(f"scale must be a number in (0, {MAX_SCALE:g}], but is: {scale!r}")
