"""``medseg predict``: a trained model on new image files, with the pipeline's own readers,
preprocessing and inference (the model bundle: `medseg.inference.bundle`)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medseg.config.sections import EvaluateConfig, PreprocessConfig
from medseg.convert.fov import fov_from_image
from medseg.errors import MedsegError
from medseg.inference.bundle import Bundle, load_bundle
from medseg.inference.predictor import Predictor
from medseg.inference.window import WindowSettings
from medseg.io.atomic import (
    cleaned_up,
    output_errors,
    publish,
    remove_leftovers,
    temp_dir,
    write_json,
)
from medseg.io.images import binarize, write_png
from medseg.io.limits import ReadOptions
from medseg.io.reader import IMAGE_SUFFIXES, read, source_format
from medseg.labels import LabelSpace, to_uint16
from medseg.preprocess.transforms import prepare_image
from medseg.progress import progress

PROBABILITIES = "probabilities"
AUTO_FALLBACK = 0.5  # threshold auto for a model that stored none (trained without validation)
STAGING = ".medseg-predict.tmp-"  # a run's temporary folder inside --out; a killed run's is removed
WRITTEN = ".medseg-predict.json"  # the files predict wrote into --out, with their SHA-256

log = logging.getLogger(__name__)


def read_options(bundle: Bundle) -> ReadOptions:
    """How inputs are read: as the convert stage read the model's training images (its DICOM
    window override and its size limit ``convert.max_pixels``; the default limit where the
    model has no convert record), one image per file. BurnedInAnnotation is not refused: no
    pixel of the input reaches an output."""
    options = ReadOptions.from_convert(bundle.convert, single=True)
    return dataclasses.replace(options, allow_burned_in=True)


def read_input(bundle: Bundle, path: Path) -> np.ndarray:
    """Read an input image as the convert stage read the model's training images.

    Returns:
        (H, W) or (H, W, 3) uint8/uint16.
    """
    return read(path, read_options(bundle))[0]


def input_fov(bundle: Bundle, fov_path: Path | None, image: np.ndarray, path: Path) -> np.ndarray:
    """The FOV of an input: its mask file, else made as convert made a missing one (from the
    image with the model's ``convert.fov_threshold`` and ``fov_erode``, or the whole image)."""
    if fov_path is not None or bundle.convert is None:
        return read_fov(fov_path, image.shape[:2], read_options(bundle))
    cfg = bundle.convert
    if cfg.fov_fallback != "threshold":
        return np.ones(image.shape[:2], dtype=bool)
    fov = fov_from_image(image, cfg.fov_threshold, cfg.fov_erode)
    if not fov.any():
        raise MedsegError(
            f"{path}: no pixel above the model's convert.fov_threshold ({cfg.fov_threshold} of "
            "full scale) to make a field of view from; give one with --fov"
        )
    return fov


def collect_inputs(paths: list[str | Path]) -> list[Path]:
    """The image files named, folders expanded to their images (not recursive), in order.

    Raises:
        MedsegError: a path is missing, a file has an unsupported ending, a folder holds no
            image, or two inputs share a stem (their outputs would overwrite each other).
    """
    found: list[Path] = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            images = sorted(
                f for f in p.iterdir()
                if f.is_file() and not f.name.startswith(".")
                and f.suffix.lower() in IMAGE_SUFFIXES
            )  # fmt: skip
            if not images:
                raise MedsegError(
                    f"{p}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})"
                )
            found.extend(images)
        elif p.is_file():
            source_format(p)  # raises on an unsupported ending
            found.append(p)
        else:
            raise MedsegError(f"{p}: no such file or folder")
    unique = list(dict.fromkeys(f.resolve() for f in found))
    stems: dict[str, Path] = {}
    for f in unique:  # letter case too: the masks would collide on macOS and Windows
        if f.stem.casefold() in stems:
            raise MedsegError(
                f"{f} and {stems[f.stem.casefold()]} share the name {f.stem!r} (up to letter "
                "case); their masks would overwrite each other in the output folder. Predict "
                "them in two runs"
            )
        stems[f.stem.casefold()] = f
    return unique


def find_fov(fov: Path | None, image: Path, n_inputs: int) -> Path | None:
    """The field-of-view mask for ``image``: ``fov`` itself when it is a file (one input only),
    else the file in folder ``fov`` whose stem is the image's stem, or starts with it plus
    ``_`` (DRIVE: ``01_test_mask.gif`` for ``01_test.tif``).

    Raises:
        MedsegError: no matching or several matching masks.
    """
    if fov is None:
        return None
    if fov.is_file():
        if n_inputs != 1:
            raise MedsegError(f"--fov {fov}: a single mask file fits one input; give a folder")
        return fov
    if not fov.is_dir():
        raise MedsegError(f"--fov {fov}: no such file or folder")
    matches = [
        f for f in sorted(fov.iterdir())
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        and (f.stem == image.stem or f.stem.startswith(image.stem + "_"))
    ]  # fmt: skip
    exact = [f for f in matches if f.stem == image.stem]
    if len(exact) == 1:
        return exact[0]
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)}"
        raise MedsegError(
            f"--fov {fov}: {what} mask(s) named {image.stem}.* or {image.stem}_*.* for {image}"
        )
    return matches[0]


def read_fov(
    path: Path | None, shape: tuple[int, int], options: ReadOptions | None = None
) -> np.ndarray:
    """The FOV mask as (H, W) bool: the file's (read with ``options``, no window), or the whole
    image when ``path`` is None."""
    if path is None:
        return np.ones(shape, dtype=bool)
    options = dataclasses.replace(options or ReadOptions(allow_multiframe=False), window=None)
    fov = binarize(read(path, options)[0])
    if fov.shape != shape:
        raise MedsegError(
            f"{path}: FOV mask is {fov.shape[1]}x{fov.shape[0]}, its image "
            f"{shape[1]}x{shape[0]} (width x height); they must match"
        )
    if not fov.any():
        raise MedsegError(f"{path}: the FOV mask is empty")
    return fov


def predict_image(
    predictor: Predictor, preprocess: PreprocessConfig, image: np.ndarray, fov: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Segment one image as the pipeline would: prepared as the model's training images
    (``preprocess``), predicted at that size, labels and probabilities at the image's.

    Args:
        predictor: e.g. `medseg.inference.predictor.Predictor.from_bundles` of a loaded bundle.
        preprocess: the bundle's preprocess params.
        image: (H, W) or (H, W, 3) uint8/uint16, as `read_input` returns it.
        fov: (H, W) bool; nothing is predicted outside it.

    Returns:
        (H, W) uint8 labels (0/1 for a binary model) and (K, H, W) float32 probabilities.
    """
    x, model_fov = prepare_image(image, fov, preprocess)
    return predictor.predict(x, model_fov, out_fov=fov)


def predict_files(
    model: str | Path,
    inputs: list[str | Path],
    out: str | Path,
    options: EvaluateConfig,
    probabilities: bool = False,
    fov: str | Path | None = None,
    preprocess: str | Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Segment image files (DICOM, TIFF, PNG, GIF, JPEG, BMP) and write one mask per image.

    Writes ``out/<stem>.png``: 0/255 for a binary model, the class labels 0..K-1 otherwise;
    with ``probabilities``, ``out/probabilities/<stem>.png`` (16-bit, probability x 65535; one
    ``<stem>_class<k>.png`` per foreground class for K > 1). Every output is written first into
    a temporary folder inside ``out`` (so ``out`` may be a mount point) and moved into place
    only when all images succeeded; other files in ``out`` are left alone. A file in ``out`` that
    predict did not write (or that was changed since) is never replaced, unless ``overwrite``;
    an input never is. A killed run's temporary folder is removed by the next run.

    Args:
        model: weights file or its folder; see `medseg.inference.bundle.load_bundle`.
        inputs: image files and folders of images.
        out: output folder, created if needed.
        options: inference settings (the ``evaluate`` params; its ``device`` is used);
            threshold ``auto``: the model's best validation threshold, 0.5 where it has none.
        probabilities: also write probability maps.
        fov: a FOV mask file (one input) or folder of masks; default: the whole image.
        preprocess: ``preprocess.json`` to use instead of the one beside the model.
        overwrite: replace files in ``out`` that predict did not write.

    Returns:
        The mask files written.

    Raises:
        MedsegError: bad model, input or FOV, or an output file that is not predict's;
            nothing is written to ``out`` then.
        OutputError: writing ``out`` failed (disk full, read-only, permission).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MedsegError(f"--out {out}: exists and is not a folder")
    files = collect_inputs(list(inputs))
    fov_dir = Path(fov) if fov is not None else None
    fovs = {f: find_fov(fov_dir, f, len(files)) for f in files}
    names = [Path(f"{f.stem}.png") for f in files]
    _refuse_overwriting_inputs(out, names, files, probabilities)
    _refuse_replacing(out, names, overwrite)
    bundle = load_bundle(model, options.device, preprocess)
    predictor = Predictor.from_bundles(
        [bundle], WindowSettings.from_config(options), options.threshold, AUTO_FALLBACK
    )
    space = predictor.labels
    if probabilities:
        _refuse_replacing(out, _probability_files(files, space), overwrite)
    created = _missing_folders(out)
    with output_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out, STAGING)
        tmp = temp_dir(out, STAGING)
    written: list[Path] = []
    with _removed_on_failure(created), cleaned_up(tmp, out):
        if probabilities:
            (tmp / PROBABILITIES).mkdir()
        for path, name in progress(
            list(zip(files, names, strict=True)), desc="predict", unit="image"
        ):
            image = read_input(bundle, path)
            fov_mask = input_fov(bundle, fovs[path], image, path)
            labels, probs = predict_image(predictor, bundle.preprocess, image, fov_mask)
            write_png(tmp / name, space.mask_image(labels))
            written.append(name)
            if probabilities:
                for suffix, prob in space.probability_maps(probs):
                    rel = Path(PROBABILITIES) / f"{path.stem}{suffix}.png"
                    write_png(tmp / rel, to_uint16(prob))
                    written.append(rel)
        _refuse_replacing(out, written, overwrite)  # once more: files may have come meanwhile
        (out / PROBABILITIES if probabilities else out).mkdir(parents=True, exist_ok=True)
        record = _written(out)
        for rel in written:
            record[rel.as_posix()] = _sha256(tmp / rel)
            publish(tmp / rel, out / rel)
        write_json(out / WRITTEN, {"files": dict(sorted(record.items()))})
    shutil.rmtree(tmp, ignore_errors=True)
    return [out / n for n in names]


def _missing_folders(out: Path) -> list[Path]:
    """``out`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for folder in [out, *out.parents]:
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    return missing


@contextlib.contextmanager
def _removed_on_failure(folders: list[Path]) -> Iterator[None]:
    """Remove ``folders`` (deepest first, those this run made) if the block fails and they are
    empty, so that a failed run leaves no trace."""
    try:
        yield
    except BaseException:
        for folder in folders:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _probability_files(files: list[Path], space: LabelSpace) -> list[Path]:
    """The probability maps' paths relative to ``out``, as `LabelSpace.probability_maps` names
    them."""
    return [
        Path(PROBABILITIES) / f"{f.stem}{suffix}.png"
        for f in files
        for suffix in space.map_suffixes
    ]


def _refuse_replacing(out: Path, targets: list[Path], overwrite: bool) -> None:
    """Nothing the user had is lost: a file in ``out`` is replaced only when predict wrote it
    and it is unchanged since (``WRITTEN``), or with ``overwrite``; a folder never."""
    record = _written(out)
    for rel in targets:
        target = out / rel
        if target.is_dir():
            raise MedsegError(f"{target}: a folder is in the way of a mask; move it away")
        if overwrite or not (target.exists() or target.is_symlink()):
            continue
        if target.is_symlink() or record.get(rel.as_posix()) != _sha256(target):
            raise MedsegError(
                f"{target}: exists and was not written by medseg predict (or changed since); "
                "move it away, choose another --out, or pass --overwrite to replace it"
            )


def _written(out: Path) -> dict[str, str]:
    """The files predict wrote into ``out`` (relative POSIX path -> SHA-256); unreadable: none."""
    try:
        files = json.loads((out / WRITTEN).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {str(k): str(v) for k, v in files.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _refuse_overwriting_inputs(
    out: Path, names: list[Path], files: list[Path], probabilities: bool
) -> None:
    """Nothing the user had is lost: an output may not replace one of the inputs."""
    inputs = set(files)
    for name in names:
        targets = [out / name]
        if probabilities:
            targets.append(out / PROBABILITIES / name)
        for target in targets:
            if target.resolve() in inputs:
                raise MedsegError(
                    f"--out {out}: the mask {target} would overwrite the input image of that "
                    "name; choose another output folder"
                )
