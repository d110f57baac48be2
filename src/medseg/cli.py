"""The medseg command: user-facing helpers; dvc repro runs the stages themselves."""

# The docstring above is the --help description: plain text, no reST (tests/test_docs.py).

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from medseg import __version__, names
from medseg.config import load_all_params
from medseg.errors import MedsegError, run_cli
from medseg.inference.window import WindowSettings
from medseg.io.atomic import write_text
from medseg.progress import logged


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The command's options, and the arguments `medseg crossval` passes on to dvc repro."""
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-params", help="validate a params file without running anything")
    check.add_argument("params", nargs="?", default="params.yaml")
    report = sub.add_parser(
        "report", help="params and metrics of the workspace against a base revision, as Markdown"
    )
    report.add_argument("--base", default="main", help="git revision to compare with (main)")
    report.add_argument("--all", action="store_true", help="list unchanged values too")
    report.add_argument("--repo", default=".", help="the repository (default: here)")
    report.add_argument("-o", "--out", help="write the Markdown to this file, not stdout")
    find = sub.add_parser(
        "find-source", help="the files under data.root behind hmac:... tokens (names: hash)"
    )
    find.add_argument("tokens", nargs="+", metavar="TOKEN")
    find.add_argument("--params", default="params.yaml")
    _add_predict(sub)
    _add_plots(sub)
    _add_export(sub)
    _add_crossval(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "crossval":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args, [a for i, a in enumerate(extra) if not (i == 0 and a == "--")]


def _add_crossval(sub: argparse._SubParsersAction) -> None:
    crossval = sub.add_parser(
        "crossval",
        help="k-fold cross-validation and the folds' ensemble (the opt-in pipeline)",
        description="Write the opt-in pipeline crossval/dvc.yaml into the repository (it is "
        "not there until asked for, so that dvc status, dvc metrics and dvc pull stay quiet "
        "about it), then run dvc repro crossval/dvc.yaml with any further arguments.",
    )
    crossval.add_argument("--repo", default=".", help="the repository (default: here)")
    crossval.add_argument(
        "--write-only", action="store_true", help="write crossval/dvc.yaml, run nothing"
    )
    crossval.add_argument(
        "--force", action="store_true", help="replace a crossval/dvc.yaml that differs"
    )


def _add_plots(sub: argparse._SubParsersAction) -> None:
    plots = sub.add_parser(
        "plots",
        help="the plots of dvc.yaml as one HTML page that renders with no network",
        description="Write every plot DVC finds in the workspace into one self-contained page: "
        "charts rendered to inline SVG, images inlined, no script and no URL to fetch. With "
        "--dvc-template, instead set up plain 'dvc plots show' to write offline pages.",
    )
    plots.add_argument("targets", nargs="*", metavar="TARGET", help="plot files (default: all)")
    plots.add_argument("-o", "--out", default="plots.html", help="the page (plots.html)")
    plots.add_argument("--repo", default=".", help="the repository (default: here)")
    plots.add_argument(
        "--dvc-template", action="store_true",
        help="write .dvc/plots/offline.html (Vega inlined) and name it in .dvc/config.local",
    )  # fmt: skip


def _add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help="a trained model as one ONNX file for deployment (onnxruntime, Triton)",
        description="Write the model with its preprocess, convert and class records in the "
        "file's metadata, dynamic batch, height and width, after checking it against the "
        "torch model with onnxruntime on a DRIVE-sized image. Needs: pip install 'medseg[onnx]'.",
    )
    export.add_argument(
        "--model", required=True, help="weights file (models/model.safetensors) or its folder"
    )
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument("--out", required=True, help="the file to write (model.onnx)")
    export.add_argument(
        "--preprocess", help="the model's preprocess.json (default: beside the weights)"
    )


def _add_predict(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser(
        "predict",
        help="segment new DICOM/TIFF/PNG/JPEG images with a trained model",
        description="Write one mask PNG per input image into --out, named by the input's stem "
        "(0/255 for a binary model, class labels otherwise). The inference options default to "
        "the values the repository's params.yaml ships in its evaluate section.",
    )
    predict.add_argument(
        "--model", required=True,
        help="weights file (models/model.safetensors), its folder, or an ONNX export (.onnx)",
    )  # fmt: skip
    predict.add_argument("--out", required=True, help="output folder (created if needed)")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    predict.add_argument(
        "--probabilities", action="store_true",
        help="also write OUT/probabilities/<stem>.png (16-bit, probability x 65535)",
    )  # fmt: skip
    predict.add_argument(
        "--fov", help="field-of-view mask file, or folder of masks named <stem>*.ext; "
        "default: made as the model's convert stage made a missing one",
    )  # fmt: skip
    predict.add_argument(
        "--preprocess", help="the model's preprocess.json (default: beside the weights)"
    )
    predict.add_argument(
        "--overwrite", action="store_true",
        help="replace files in --out that medseg predict did not write (an input never is)",
    )  # fmt: skip
    predict.add_argument(
        "--threshold", type=_threshold, default="auto",
        help="foreground probability cut, or auto (default): the model's best validation "
        "threshold, 0.5 where it has none",
    )  # fmt: skip
    window = WindowSettings()  # the sliding window's defaults, written once (inference/window.py)
    predict.add_argument("--window", type=int, default=window.window, help="sliding-window side")
    predict.add_argument("--overlap", type=float, default=window.overlap)
    predict.add_argument("--blending", choices=names.BLENDINGS, default=window.blending)
    predict.add_argument("--tta", action="store_true", help="average over flipped images")
    predict.add_argument(
        "--batch-size", type=int, default=window.batch_size, help="windows per forward pass"
    )
    predict.add_argument("--device", choices=names.DEVICES, default="auto")


def _threshold(text: str) -> float | str:
    return text if text == "auto" else float(text)


def _predict(args: argparse.Namespace) -> None:
    from medseg.config.evaluate import EvaluateConfig
    from medseg.inference.predict import predict_files  # imports torch: only when predicting

    try:
        options = EvaluateConfig(
            threshold=args.threshold, window=args.window, overlap=args.overlap,
            blending=args.blending, tta=args.tta, batch_size=args.batch_size,
            device=args.device,
        )  # fmt: skip
    except MedsegError as err:  # name the option, not the params key
        message = str(err).replace("params: evaluate.", "--").replace("batch_size", "batch-size")
        raise MedsegError(message) from None
    masks = predict_files(
        args.model, args.inputs, args.out, options,
        probabilities=args.probabilities, fov=args.fov, preprocess=args.preprocess,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {len(masks)} mask(s) to {args.out}")


def _main(argv: Sequence[str] | None) -> None:
    args, extra = parse_args(argv)
    if args.command == "check-params":
        load_all_params(args.params)
        print(f"{args.params}: ok")
    elif args.command == "report":
        _report(args)
    elif args.command == "predict":
        _predict(args)
    elif args.command == "plots":
        _plots(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "find-source":
        _find_source(args)
    elif args.command == "crossval":
        _crossval(args, extra)


def _plots(args: argparse.Namespace) -> None:
    from medseg.review.plots import install_dvc_template, write_report

    if args.dvc_template:
        print(f"wrote {install_dvc_template(args.repo)}; `dvc plots show` now renders offline")
    else:
        found = write_report(args.out, args.repo, args.targets)
        print(
            f"wrote {args.out}: {len(found.charts)} chart(s), {len(found.images)} image(s), "
            f"{len(found.missing)} not in the workspace"
        )


def _export(args: argparse.Namespace) -> None:
    from medseg.inference.export import (  # imports torch: only when exporting
        CHECK_SIZE,
        export_onnx,
    )

    diff = export_onnx(args.model, args.out, preprocess=args.preprocess)
    print(
        f"wrote {args.out}; onnxruntime vs torch on a {CHECK_SIZE[1]}x{CHECK_SIZE[0]} image: "
        f"largest probability difference {diff:.2g}"
    )


def _find_source(args: argparse.Namespace) -> None:
    from medseg.config import load_params
    from medseg.config.sections import DataConfig
    from medseg.convert.pseudonyms import find_sources, id_key

    root = Path(load_params(args.params, DataConfig).root)
    for token, paths in find_sources(root, args.tokens, id_key(create=False)).items():
        print(f"{token}: {', '.join(map(str, paths)) or 'no file under ' + str(root)}")


CROSSVAL_PIPELINE = Path("crossval") / "dvc.yaml"


def write_crossval_pipeline(repo: str | Path, force: bool = False) -> Path:
    """Write the opt-in cross-validation pipeline into ``repo`` as ``crossval/dvc.yaml``.

    An existing file that is the same is kept; one that differs (edited, or from another medseg
    version) is replaced only with ``force``.

    Returns:
        The path of the pipeline file.
    """
    from importlib.resources import files

    root = Path(repo)
    if not (root / "dvc.yaml").is_file():
        raise MedsegError(f"{root}: no dvc.yaml here; run medseg crossval in the repository root")
    text = files("medseg").joinpath("crossval_dvc.yaml").read_text()
    path = root / CROSSVAL_PIPELINE
    if path.exists() and path.read_text() != text and not force:
        raise MedsegError(
            f"{path} differs from this medseg version's pipeline; keep it and run "
            "dvc repro crossval/dvc.yaml, or replace it with medseg crossval --force"
        )
    path.parent.mkdir(exist_ok=True)
    write_text(path, text)
    return path


def _crossval(args: argparse.Namespace, extra: list[str]) -> None:
    path = write_crossval_pipeline(args.repo, force=args.force)
    print(f"wrote {path}; commit it to keep the cross-validation in the repository")
    if not args.write_only:
        cmd = [sys.executable, "-m", "dvc", "repro", CROSSVAL_PIPELINE.as_posix(), *extra]
        print(" ".join(["dvc", *cmd[3:]]), flush=True)
        code = subprocess.run(cmd, cwd=args.repo, check=False).returncode
        if code:
            raise MedsegError(f"dvc repro crossval/dvc.yaml failed (exit {code}); see above")


def _report(args: argparse.Namespace) -> None:
    from medseg.review.report import compare, to_markdown

    text = to_markdown(compare(args.repo, base=args.base, all_rows=args.all))
    if args.out:
        write_text(args.out, text)
    else:
        sys.stdout.write(text)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``medseg`` console script."""
    with logged(logging.INFO):
        code = run_cli(_main, argv)
    sys.exit(code)
