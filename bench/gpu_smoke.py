"""The smoke run bench/gpu.sh starts with (well under a minute on a GPU): the real train and
evaluate stages on the run's own params, shrunk, so that whatever would break the run breaks
here first, in one line, and leaves the device time for a second call.

1. The versions and files of python, torch (its CUDA, the GPU, bf16) and of every package the
   stages import (the wheels gpu.sh unpacked must win), printed before medseg is imported, so
   they show even when it cannot be; a package the stages need that does not import fails here.
2. medseg imports; on the run's device, patches cut there equal those cut on the host for one
   plan of the real training split, bit for bit, and one forward and backward pass of the run's
   network under the run's autocast is finite.
3. The train stage (``stages/train.py``, as gpu.sh runs it) on the run's params with one epoch of
   `SMOKE_STEPS` steps, validated on `SMOKE_CASES` validation cases, with checkpoints and
   ``train.compile`` off (the run measures the compile): it must exit 0, write both weights and
   their specs, write a checkpoint (the epoch clock's ``checkpoint_s``) and remove it at the end
   (the finished note), and give a finite validation Dice.
4. The evaluate stage on `SMOKE_CASES` test cases with that model: exit 0 and a test Dice.
5. ``smoke.json``: the seconds it measured (start-up, per image trained, per validation case),
   from which ``fit`` caps the run's ``train.epochs`` so that the run ends inside its time limit
   instead of being cut off with no model (with ``train.compile`` on, keeping ``--compile-s``
   seconds for the compile, which the smoke run leaves out).

The first failure prints ``SMOKE FAILED: <what, and where to look>`` as its last line and exits 1.

    python bench/gpu_smoke.py run --params P --data PROCESSED --work DIR [--limit 90]
    python bench/gpu_smoke.py fit DIR/smoke.json P SECONDS [--compile-s 90]  # caps train.epochs
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import machine

REPO = Path(__file__).resolve().parents[1]
SMOKE_STEPS = 8  # one epoch of this many steps: the first one tunes, the rest give a rate
SMOKE_CASES = 2  # validation and test cases
SAFETY = 1.3  # `fit`: the measured seconds per epoch and validation, times this
MARGIN_S = 10.0  # `fit`: left over at the end of the train stage's time
# what the train and evaluate stages import (by module name), then what they use when present
REQUIRED = (
    "torch", "numpy", "timm", "huggingface_hub", "safetensors", "segmentation_models_pytorch",
    "edt", "scipy", "skimage", "tifffile", "PIL", "pandas", "yaml", "tqdm",
)  # fmt: skip
OPTIONAL = ("dvclive", "pynvml", "onnxruntime")


class SmokeFailed(Exception):
    """One line: what failed, and where to look."""


def versions() -> None:
    """Print the machine, python and each package's version and file (standard library and
    the packages themselves only: no medseg yet).

    Raises:
        SmokeFailed: a package of `REQUIRED` does not import.
    """
    print(machine())
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    missing = []
    for name in REQUIRED + OPTIONAL:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # the log must say all that is missing, not the first only
            print(f"{name}: NOT IMPORTABLE ({type(err).__name__}: {err})")
            missing += [name] if name in REQUIRED else []
            continue
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    if missing:
        raise SmokeFailed(
            f"{', '.join(missing)} do not import (above): the stages need them; the wheels in "
            ".gpu/whl are unpacked ahead of the machine's packages (bench/gpu_prepare.sh)"
        )
    import torch

    if torch.cuda.is_available():
        print(
            f"cuda {torch.version.cuda}: {torch.cuda.get_device_name()}, capability "
            f"{torch.cuda.get_device_capability()}, bf16 {torch.cuda.is_bf16_supported()}"
        )
    else:
        print(f"cuda: none visible to torch {torch.__version__} (built for {torch.version.cuda})")


def device_checks(params: Path, data: Path) -> str:
    """Step 2: medseg imports, device crops equal host crops, a finite step; return the device.

    Raises:
        SmokeFailed: a check failed (or medseg does not import, or the device is missing).
    """
    try:
        from medseg.config import load_params
        from medseg.config.train import TrainConfig
        from medseg.errors import MedsegError
        from medseg.model import resolve_device
    except Exception as err:
        raise SmokeFailed(f"medseg does not import: {type(err).__name__}: {err}") from err
    try:
        cfg = load_params(params, TrainConfig)
        device = resolve_device(cfg.device)
    except MedsegError as err:
        raise SmokeFailed(str(err)) from err
    crops_match(cfg, data, device)
    print(f"device crops equal host crops on {device}: ok")
    finite_step(cfg, data, device)
    return device.type


def crops_match(cfg: Any, data: Path, device: Any) -> None:
    """Patches cut on ``device`` equal the host's for one plan (4 steps of 16) of the split."""
    import dataclasses

    import numpy as np
    import torch

    from medseg.preprocess.processed import open_split, read_class_names
    from medseg.training.cache import make_sampler

    store = open_split(data, "train")
    n_labels = len(read_class_names(data))
    host = make_sampler(store, cfg, np.random.default_rng(1), n_labels)
    dev = make_sampler(store, cfg, np.random.default_rng(1), n_labels, device)
    plan, dplan = host.plan(4, 16), dev.plan(4, 16)
    for step in range(4):
        a, b = host.crop(plan, step), dev.crop(dplan, step)
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if y.device.type != device.type or not torch.equal(x, y.cpu()):
                raise SmokeFailed(
                    f"step {step}: {field.name} cut on {device} differs from the host's"
                )


def finite_step(cfg: Any, data: Path, device: Any) -> None:
    """One forward and backward pass of the run's network under its autocast is finite."""
    import torch

    from medseg.model import build_model
    from medseg.preprocess.processed import open_split
    from medseg.spec import ModelSpec
    from medseg.training.precision import amp_dtype

    channels = int(open_split(data, "train").get(0, "image").shape[0])
    torch.manual_seed(0)
    model = build_model(ModelSpec.from_config(cfg, in_channels=channels), None).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(8, channels, cfg.patch_size, cfg.patch_size, device=device)
    dtype = amp_dtype(cfg, device) or torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(x)
    loss = logits.float().square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = bool(torch.isfinite(logits).all()) and bool(torch.isfinite(loss)) and bool(grads)
    if not (finite and all(bool(torch.isfinite(g).all()) for g in grads)):
        raise SmokeFailed(f"a forward and backward pass in {dtype} gave a non-finite value")
    name = str(dtype).removeprefix("torch.")
    print(f"forward/backward in {name}: loss {float(loss.detach()):.4g}, ok")


def smoke_data(data: Path, out: Path) -> int:
    """A data folder of views into ``data`` (no array copied): every training case,
    `SMOKE_CASES` validation and test cases, the records; return the run's validation cases."""
    from medseg.io.shards import write_view
    from medseg.preprocess.processed import SPLITS, open_split

    out.mkdir(parents=True)
    n_val = 0
    for split in SPLITS:
        store = open_split(data, split)
        n_val = len(store) if split == "val" else n_val
        keep = len(store) if split == "train" else SMOKE_CASES
        write_view(out, split, [(store, i) for i in range(min(keep, len(store)))])
    for path in data.iterdir():  # the records (preprocess, convert, classes): all but the splits
        if path.is_file() and path.suffix != ".bin" and path.stem not in SPLITS:
            shutil.copyfile(path, out / path.name)
    return n_val


def smoke_params(params: Path, out: Path) -> dict:
    """The run's params with one short epoch, validated, no compile; return the train section."""
    import yaml

    p = yaml.safe_load(params.read_text())
    t = p["train"]
    t.update(epochs=1, patches_per_epoch=SMOKE_STEPS * t["batch_size"], val_every=1, compile=False)
    out.write_text(yaml.safe_dump(p, sort_keys=False))
    return t


def stage(name: str, args: list[str], log: Path, seconds: float) -> float:
    """Run ``stages/<name>.py`` with ``args`` (output to ``log`` and, at its end, here); return
    its wall seconds.

    Raises:
        SmokeFailed: it failed or ran past ``seconds``, with its ``error:`` line or last line.
    """
    start = time.perf_counter()
    cmd = [sys.executable, str(REPO / "stages" / f"{name}.py"), *args]
    with log.open("w") as out:
        try:
            rc = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, timeout=seconds
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    print("\n".join(f"  {name}| {line}" for line in lines[-12:]))
    wall = time.perf_counter() - start
    if rc is None:
        raise SmokeFailed(f"the {name} stage ran past {seconds:.0f} s (log: {log})")
    if rc != 0:
        errors = [line for line in lines if line.startswith("error:")]
        last = (errors or lines or ["(no output)"])[-1]
        raise SmokeFailed(f"the {name} stage exited {rc}: {last[:400]} (log: {log})")
    print(f"{name} stage: exit 0 in {wall:.1f} s")
    return wall


def epoch_clock(log: Path) -> dict:
    """The train stage's one "epoch clock" record (its last, if several)."""
    clocks = [
        json.loads(line.partition("epoch clock ")[2])
        for line in log.read_text(errors="replace").splitlines()
        if "epoch clock " in line
    ]
    if not clocks:
        raise SmokeFailed(f"the train stage logged no 'epoch clock' line (log: {log})")
    return clocks[-1]


def check_train(work: Path, clock: dict) -> float:
    """The train stage's outputs are whole; return its validation Dice."""
    from medseg.training.checkpoint import FINISHED

    for name in ("model.safetensors", "last.safetensors", "model.json", "last.json"):
        if not (work / "models" / name).is_file():
            raise SmokeFailed(f"the train stage wrote no {work / 'models' / name}")
    if "checkpoint_s" not in clock:
        raise SmokeFailed("the train stage wrote no checkpoint (no checkpoint_s in its clock)")
    if not (work / "checkpoints" / FINISHED).is_file():
        raise SmokeFailed(f"the train stage did not finish its checkpoint folder ({FINISHED})")
    metrics = json.loads((work / "train" / "metrics.json").read_text())
    dice = metrics.get("best_val_dice")
    if not isinstance(dice, float) or not math.isfinite(dice):
        raise SmokeFailed(f"validation gave no finite Dice ({work / 'train' / 'metrics.json'})")
    return dice


def run(params: Path, data: Path, work: Path, limit: float) -> dict:
    """Steps 1 to 5 into ``work`` (made afresh); return what ``smoke.json`` holds.

    Raises:
        SmokeFailed: the first check that failed.
    """
    start = time.perf_counter()
    versions()
    device = device_checks(params, data)
    if work.exists():
        shutil.rmtree(work)
    n_val = smoke_data(data, work / "data")
    train_p = smoke_params(params, work / "params.yaml")
    left = limit - (time.perf_counter() - start)
    train_s = stage(
        "train",
        ["--params", str(work / "params.yaml"), "--data", str(work / "data"), "--models",
         str(work / "models"), "--logs", str(work / "train"), "--checkpoints",
         str(work / "checkpoints")],
        work / "train.log", max(left - 15, 10),
    )  # fmt: skip
    clock = epoch_clock(work / "train.log")
    dice = check_train(work, clock)
    left = limit - (time.perf_counter() - start)
    evaluate_s = stage(
        "evaluate",
        ["--params", str(work / "params.yaml"), "--data", str(work / "data"), "--model",
         str(work / "models"), "--out", str(work / "evaluate")],
        work / "evaluate.log", max(left, 10),
    )  # fmt: skip
    metrics = json.loads((work / "evaluate" / "metrics.json").read_text())
    test_dice = metrics["test"]["fov"]["dice"]
    steps = SMOKE_STEPS
    timed = clock["end"] - clock["first_step_end"]  # steps 2..N: cuDNN tuned by then
    result = {
        "device": device,
        "train_s": train_s,
        "evaluate_s": evaluate_s,
        "batch_size": train_p["batch_size"],
        "patches": steps * train_p["batch_size"],
        "image_s": timed / ((steps - 1) * train_p["batch_size"]),
        "plan_s_per_image": clock["plan_s"] / (steps * train_p["batch_size"]),
        "val_s_per_case": (clock["val_end"] - clock["end"]) / min(SMOKE_CASES, n_val or 1),
        "epoch_s": clock["end"] - clock["start"],
        "run_val_cases": n_val,
        "val_dice": dice,
        "test_dice": test_dice,
    }
    # start-up, the first step (cuDNN tuning), writing the models: all but steps 2..N and validation
    result["other_s"] = train_s - timed - (clock["val_end"] - clock["end"])
    (work / "smoke.json").write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"smoke: {device}, {steps} steps of {train_p['batch_size']} "
        f"({1 / result['image_s']:.0f} images/s after the first step), val Dice {dice:.3f} "
        f"on {SMOKE_CASES} cases, test Dice {test_dice:.3f} on {SMOKE_CASES}"
    )
    print(f"smoke run passed in {time.perf_counter() - start:.1f} s")
    return result


def fit_epochs(smoke: dict, patches: int, epochs: int, val_every: int, seconds: float) -> int:
    """The most epochs, at most ``epochs``, that a train stage of ``patches`` patches an epoch
    and a validation every ``val_every`` epochs (and after the last) ends in ``seconds``, by
    the smoke run's measures (`SAFETY` on the epochs and validations, `MARGIN_S` left over);
    at least 1."""
    epoch_s = patches * (smoke["image_s"] + smoke["plan_s_per_image"])
    val_s = smoke["val_s_per_case"] * smoke["run_val_cases"]
    fixed = smoke["other_s"] + MARGIN_S
    for n in range(epochs, 0, -1):
        validations = n // val_every + (n % val_every != 0) if smoke["run_val_cases"] else 0
        if fixed + SAFETY * (n * epoch_s + validations * val_s) <= seconds:
            return n
    return 1


def fit(smoke_json: Path, params: Path, seconds: float, compile_s: float) -> None:
    """Cap ``train.epochs`` in ``params`` (rewritten) by `fit_epochs`; say so when it does.
    With ``train.compile`` on, ``compile_s`` seconds are kept for the compile, which the smoke
    run did not do."""
    import yaml

    p = yaml.safe_load(params.read_text())
    t = p["train"]
    smoke = json.loads(smoke_json.read_text())
    kept = compile_s if t.get("compile") else 0.0
    n = fit_epochs(smoke, t["patches_per_epoch"], t["epochs"], t["val_every"], seconds - kept)
    within = f"the train stage's {seconds:.0f} s" + (
        f", {kept:.0f} s kept to compile" if kept else ""
    )
    if n < t["epochs"]:
        print(
            f"train.epochs {t['epochs']} -> {n}: by the smoke run's measures only {n} fit in "
            f"{within} (set TRAIN_MAX or BUDGET for more)"
        )
        t["epochs"] = n
        params.write_text(yaml.safe_dump(p, sort_keys=False))
    else:
        print(f"train.epochs {t['epochs']}: fit in {within}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    smoke = sub.add_parser("run", help="the smoke run")
    smoke.add_argument("--params", type=Path, required=True, help="the run's params")
    smoke.add_argument("--data", type=Path, required=True, help="the preprocess stage's output")
    smoke.add_argument("--work", type=Path, required=True, help="its folder (made afresh)")
    smoke.add_argument("--limit", type=float, default=90.0, help="seconds for it all")
    capped = sub.add_parser("fit", help="cap train.epochs to the train stage's time")
    capped.add_argument("smoke_json", type=Path)
    capped.add_argument("params", type=Path)
    capped.add_argument("seconds", type=float)
    capped.add_argument("--compile-s", type=float, default=90.0, help="kept to compile")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.action == "fit":
        fit(args.smoke_json, args.params, args.seconds, args.compile_s)
        return
    try:
        run(args.params, args.data, args.work, args.limit)
    except SmokeFailed as err:
        print(f"SMOKE FAILED: {err}")
        sys.exit(1)
    except Exception as err:  # anything else is a failure too, in one line after its traceback
        import traceback

        traceback.print_exc()
        print(f"SMOKE FAILED: {type(err).__name__}: {err}")
        sys.exit(1)


if __name__ == "__main__":
    main()
