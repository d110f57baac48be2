from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_params, write_params
from safetensors.numpy import load_file

from medseg.config import load_params
from medseg.config.sections import EvaluateConfig, TrainConfig
from medseg.errors import MedsegError
from medseg.training.callbacks import MACHINE_CURVES, Callback
from medseg.training.checkpoint import CHECKPOINT, FINISHED, save_checkpoint
from medseg.training.loop import Trainer, fit
from medseg.training.optim import lr_factor


def _curve(out: Path, name: str) -> list[str]:
    return (out / "logs" / "plots" / "metrics" / name).read_text().splitlines()


def _cfg(tmp_path: Path, **train: object) -> TrainConfig:
    params = tiny_params(train={"epochs": 2, **train})
    return load_params(write_params(tmp_path / "p.yaml", params), TrainConfig)


def test_fit_writes_weights_and_curves(processed: Path, tmp_path: Path):
    summary = fit(_cfg(tmp_path), processed, tmp_path / "models", tmp_path / "logs")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "classes.json", "convert.json", "last.json", "last.safetensors", "model.json",
        "model.safetensors", "preprocess.json",
    ]  # fmt: skip
    # the preprocess params travel with the weights, for `medseg predict`
    assert (tmp_path / "models" / "preprocess.json").read_bytes() == (
        processed / "preprocess.json"
    ).read_bytes()
    assert summary["best_epoch"] in (1, 2) and 0.0 <= summary["best_val_dice"] <= 1.0
    loss = (tmp_path / "logs" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert loss[0].split("\t") == ["step", "loss"] and len(loss) == 3
    speed = tmp_path / "logs" / "plots" / "metrics" / "throughput_images_per_s.tsv"
    assert len(speed.read_text().splitlines()) == 3  # a curve, but not in the metrics file
    metrics = json.loads((tmp_path / "logs" / "metrics.json").read_text())
    assert metrics["best_epoch"] == summary["best_epoch"] and "val" in metrics
    assert not any(key in metrics for key in MACHINE_CURVES)


def test_cpu_training_is_deterministic(processed: Path, tmp_path: Path):
    cfg = _cfg(tmp_path, epochs=1)
    fit(cfg, processed, tmp_path / "a", tmp_path / "la")
    fit(cfg, processed, tmp_path / "b", tmp_path / "lb")
    a = load_file(str(tmp_path / "a" / "last.safetensors"))
    b = load_file(str(tmp_path / "b" / "last.safetensors"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = _cfg(tmp_path, epochs=1, seed=1)
    fit(c, processed, tmp_path / "c", tmp_path / "lc")
    other = load_file(str(tmp_path / "c" / "last.safetensors"))
    assert not all(np.array_equal(a[k], other[k]) for k in a)


# --- schedule ------------------------------------------------------------------------------------


def test_lr_factor_by_hand():
    # warm-up over 4 steps: 1/4, 2/4, 3/4, 4/4 of lr; then cosine from 1 down to 0 at step 9
    assert [lr_factor(s, 10, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4, "cosine") == pytest.approx(1.0)
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5)  # half-way: t = 3/6
    assert lr_factor(10, 10, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(10, 10, 4, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(7, 10, 4, "poly", power=2.0) == pytest.approx(0.25)  # (1 - 1/2) ** 2
    assert lr_factor(9, 10, 0, "constant") == 1.0


# --- a stop signal, then resume; a non-finite loss ------------------------------------------------


def _stage(params: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "stages" / "train.py"), "--params", str(params),
        "--data", str(data), "--models", str(out / "models"), "--logs", str(out / "logs"),
        "--checkpoints", str(out / "checkpoints"),
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}


def test_sigterm_then_rerun_gives_the_uninterrupted_result(processed: Path, tmp_path: Path):
    # 3 epochs of 6 steps, every augmentation on, validation each epoch; the uninterrupted run
    # holds the cases in RAM, the interrupted one reads them memory-mapped: the same result
    train = {"epochs": 3, "patches_per_epoch": 24, "aug_prob": 0.8}
    ram = write_params(tmp_path / "ram.yaml", tiny_params(train={**train, "cache": "ram"}))
    params = write_params(tmp_path / "p.yaml", tiny_params(train={**train, "cache": "none"}))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(_stage(ram, processed, whole), env=_env(), check=True, timeout=600)

    proc = subprocess.Popen(
        _stage(params, processed, cut), env=_env(), stderr=subprocess.PIPE, text=True
    )
    ckpt = cut / "checkpoints" / CHECKPOINT
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # soon after epoch 1 ends: in epoch 2
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert "stopped by SIGTERM" in stderr and "run the same command" in stderr
    saved = torch.load(ckpt, weights_only=True)
    assert (saved["epoch"], saved["step"]) != (3, 0)
    assert not (cut / "models").exists()  # no half-written outputs

    rerun = subprocess.run(
        _stage(params, processed, cut), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stderr
    for name in ("model.safetensors", "last.safetensors"):
        a = load_file(str(whole / "models" / name))
        b = load_file(str(cut / "models" / name))
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    for curve in ("train/loss.tsv", "val/dice.tsv", "lr.tsv"):
        assert _curve(cut, curve) == _curve(whole, curve)
    assert len(_curve(cut, "train/loss.tsv")) == 4
    metrics = json.loads((cut / "logs" / "metrics.json").read_text())
    assert (
        metrics["best_val_dice"]
        == json.loads((whole / "logs" / "metrics.json").read_text())["best_val_dice"]
    )
    assert [p.name for p in (cut / "checkpoints").iterdir()] == [FINISHED]  # removed after success


class _StopAfterEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        if trainer.epoch == self.epoch:
            trainer.stop.requested = "SIGTERM"


def test_background_checkpoints_resume_exactly_and_epochs_are_clocked(
    processed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Checkpoints written in the background (as on a GPU) from a host copy: a run stopped
    after epoch 1 and resumed ends with the uninterrupted run's weights. Each epoch logs its
    wall-clock start and end, plan and checkpoint seconds, and the first step's end."""
    cfg = _cfg(tmp_path, epochs=3, patches_per_epoch=8, batch_size=4, aug_prob=0.8)

    def trainer(out: str, stop: Callback | None = None) -> Trainer:
        hooks = [stop] if stop else []
        t = Trainer.from_config(
            cfg, processed, checkpoint_dir=tmp_path / out / "ck", callbacks=hooks
        )
        t.checkpoints.background = True
        return t

    with caplog.at_level("INFO", logger="medseg.training.loop"):
        trainer("whole").run(tmp_path / "whole" / "models")
    clocks = [
        json.loads(r.getMessage().split("epoch clock ", 1)[1])
        for r in caplog.records
        if r.getMessage().startswith("epoch clock ")
    ]
    assert [c["epoch"] for c in clocks] == [1, 2, 3]
    for c in clocks:
        assert c["start"] < c["end"] <= c["val_end"] and c["images"] == 8
        assert 0 <= c["plan_s"] < c["end"] - c["start"] and c["checkpoint_s"] >= 0
    assert clocks[0]["start"] < clocks[0]["first_step_end"] <= clocks[0]["end"]
    assert clocks[0]["val_end"] <= clocks[1]["start"]

    with pytest.raises(MedsegError, match="stopped by SIGTERM"):
        trainer("cut", _StopAfterEpoch(1)).run(tmp_path / "cut" / "models")
    trainer("cut").run(tmp_path / "cut" / "models")
    for name in ("model.safetensors", "last.safetensors"):
        a = load_file(str(tmp_path / "whole" / "models" / name))
        b = load_file(str(tmp_path / "cut" / "models" / name))
        assert all(np.array_equal(a[k], b[k]) for k in a), name


def test_checkpoint_of_other_params_is_not_resumed(processed: Path, tmp_path: Path, caplog):
    ckpt_dir = tmp_path / "ck"
    save_checkpoint(ckpt_dir / CHECKPOINT, {"params_hash": "from another experiment"})
    fit(_cfg(tmp_path, epochs=1), processed, tmp_path / "m", tmp_path / "l", ckpt_dir)
    assert "checkpoint of other train params" in caplog.text
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert [p.name for p in ckpt_dir.iterdir()] == [FINISHED]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(
    processed: Path, tmp_path: Path
):
    # an absurd learning rate: epoch 1 (one step) is still finite, then the weights overflow
    cfg = _cfg(tmp_path, epochs=3, patches_per_epoch=4, lr=1.0e30, warmup_epochs=0.0, grad_clip=0.0)
    with pytest.raises(MedsegError, match=r"loss became nan in epoch 2, step 1 .*checkpoint"):
        fit(cfg, processed, tmp_path / "m", tmp_path / "l", tmp_path / "ck")
    saved = torch.load(tmp_path / "ck" / CHECKPOINT, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 0)
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
    assert not (tmp_path / "m").exists()


# --- models, classes, validation ------------------------------------------------------------------


def test_two_classes_softmax_and_validation_every_second_epoch(processed: Path, tmp_path: Path):
    cfg = _cfg(tmp_path, classes=2, epochs=3, val_every=2, arch="linknet", optimizer="adam")
    summary = fit(cfg, processed, tmp_path / "m", tmp_path / "logs")
    assert summary["best_epoch"] in (2, 3)  # validated after epochs 2 and 3 (the last) only
    assert len(_curve(tmp_path, "val/dice.tsv")) == 1 + 2
    assert json.loads((tmp_path / "m" / "model.json").read_text())["classes"] == 2


def test_data_with_more_classes_than_params_say(processed: Path, tmp_path: Path):
    data = tmp_path / "proc"
    shutil.copytree(processed, data)
    (data / "classes.json").write_text('{"names": ["background", "vessel", "disc"]}')
    with pytest.raises(MedsegError, match=r"train.classes is 1 but the data .* has 3 labels"):
        fit(_cfg(tmp_path), data, tmp_path / "m", tmp_path / "l")


def test_patch_too_small_for_the_architecture(processed: Path, tmp_path: Path):
    with pytest.raises(MedsegError, match=r"train.arch pan .* train.patch_size 32"):
        fit(_cfg(tmp_path, arch="pan"), processed, tmp_path / "m", tmp_path / "l")


# --- several processes ----------------------------------------------------------------------------


def test_torchrun_two_processes_match_one_process(processed: Path, tmp_path: Path):
    """The same stage under torchrun with gloo: the loss of one process over the same batch.

    In fp32: under bf16 autocast (``amp_cpu: auto`` on a CPU with native bf16) the two
    processes' half batches round otherwise than the whole batch (0.6835 against 0.6851)."""
    params = write_params(
        tmp_path / "p.yaml",
        tiny_params(train={"epochs": 1, "patches_per_epoch": 8, "amp_cpu": False}),
    )
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    subprocess.run(_stage(params, processed, one), env=env, check=True, timeout=600)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--"]
    cmd = torchrun + _stage(params, processed, two)[1:]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 2 steps: the first identical but for rounding, the second after one (nearly) equal update
    loss_one = float(_curve(one, "train/loss.tsv")[1].split("\t")[1])
    loss_two = float(_curve(two, "train/loss.tsv")[1].split("\t")[1])
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    assert (two / "models" / "model.safetensors").is_file()
    assert [p.name for p in (two / "checkpoints").iterdir()] == [FINISHED]


# --- CUDA (skipped without a GPU) ----------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_amp_deterministic_runs_are_identical(processed: Path, tmp_path: Path):
    cfg = _cfg(tmp_path, device="cuda", amp=True, deterministic=True, epochs=2)
    for name in ("a", "b"):
        fit(cfg, processed, tmp_path / name, tmp_path / name / "logs")
    a = load_file(str(tmp_path / "a" / "last.safetensors"))
    b = load_file(str(tmp_path / "b" / "last.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    peak = tmp_path / "a" / "logs" / "plots" / "metrics" / "gpu_peak_memory_gib.tsv"
    assert float(peak.read_text().splitlines()[-1].split("\t")[-1]) > 0
    assert not torch.are_deterministic_algorithms_enabled()  # the setting is put back


@pytest.mark.gpu
@needs_cuda
def test_cuda_workers_with_pinned_memory(processed: Path, tmp_path: Path):
    """DataLoader workers with pinned memory give the batches of in-process cutting."""
    runs = {}
    for workers in (0, 2):
        cfg = _cfg(tmp_path, device="cuda", deterministic=True, workers=workers)
        out = tmp_path / f"w{workers}"
        fit(cfg, processed, out, out / "logs", out / "ck")
        runs[workers] = load_file(str(out / "last.safetensors"))
    assert all(np.array_equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_dataloader_workers_give_the_same_training(processed: Path, tmp_path: Path):
    cfg = _cfg(tmp_path, epochs=1)
    fit(cfg, processed, tmp_path / "a", tmp_path / "la")
    mapped = dataclasses.replace(cfg, workers=2, cache="none")  # workers read the shards
    fit(mapped, processed, tmp_path / "b", tmp_path / "lb")
    a = load_file(str(tmp_path / "a" / "last.safetensors"))
    b = load_file(str(tmp_path / "b" / "last.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_backend_flags_are_set_and_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deterministic: bool
):
    """The flags themselves need no GPU to be set: check them for a CUDA device on any machine."""
    from medseg.training.precision import backend_flags as _backend_flags

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark)
    with _backend_flags(_cfg(tmp_path, deterministic=deterministic), torch.device("cuda")):
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert cudnn.deterministic is deterministic and cudnn.benchmark is not deterministic
        assert ("CUBLAS_WORKSPACE_CONFIG" in os.environ) is deterministic
    after = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark)
    assert after == before


# --- the public parts: device cache, callbacks, threshold auto -----------------------------------


def test_device_cache_trains_the_same_weights(processed: Path, tmp_path: Path):
    fit(_cfg(tmp_path, epochs=1, cache="ram"), processed, tmp_path / "a", tmp_path / "la")
    fit(_cfg(tmp_path, epochs=1, cache="device"), processed, tmp_path / "b", tmp_path / "lb")
    a = load_file(str(tmp_path / "a" / "last.safetensors"))
    b = load_file(str(tmp_path / "b" / "last.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


class _Counter(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_run_start(self, trainer: Trainer) -> None:
        self.calls.append("run_start")

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.calls.append("epoch_start")

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        assert loss.ndim == 0
        self.calls.append("step")

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        assert "train/loss" in record
        self.calls.append("epoch_end")

    def on_run_end(self, trainer: Trainer) -> None:
        self.calls.append("run_end")


def test_callbacks_see_every_step_and_dvclive_is_optional(
    processed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, "dvclive", None)  # `import dvclive` raises ImportError
    cfg = _cfg(tmp_path, epochs=2, patches_per_epoch=8, batch_size=4)
    counter = _Counter()
    fit(cfg, processed, tmp_path / "models", tmp_path / "logs", callbacks=[counter])
    epoch = ["epoch_start", "step", "step", "epoch_end"]
    assert counter.calls == ["run_start", *epoch, *epoch, "run_end"]
    # without dvclive: its files, in its layout
    metrics = json.loads((tmp_path / "logs" / "metrics.json").read_text())
    assert set(metrics) >= {"train", "lr", "val", "best_epoch", "best_val_dice", "step"}
    assert "dice" in metrics["val"] and not any(key in metrics for key in MACHINE_CURVES)
    loss = _curve(tmp_path, "train/loss.tsv")
    assert loss[0].split("\t") == ["step", "loss"] and len(loss) == 3
    assert len(_curve(tmp_path, "throughput_images_per_s.tsv")) == 3
    assert (tmp_path / "models" / "model.safetensors").is_file()


def test_threshold_auto_comes_from_validation_through_the_bundle(processed: Path, tmp_path: Path):
    from medseg.evaluation.evaluate import evaluate_model
    from medseg.inference.bundle import load_bundle

    fit(_cfg(tmp_path, epochs=1), processed, tmp_path / "models", tmp_path / "logs")
    saved = load_bundle(tmp_path / "models", "cpu").threshold
    curve = _curve(tmp_path, "val/threshold.tsv")
    assert saved is not None and float(curve[1].split("\t")[1]) == saved
    assert load_bundle(tmp_path / "models" / "last.safetensors", "cpu").threshold is None
    params = write_params(tmp_path / "e.yaml", tiny_params(evaluate={"threshold": "auto"}))
    cfg = load_params(params, EvaluateConfig)
    assert cfg.threshold == "auto"
    metrics = evaluate_model(cfg, processed, tmp_path / "models", tmp_path / "eval")
    assert metrics["threshold"] == pytest.approx(saved)
    # weights without one: auto is refused, naming the key
    with pytest.raises(MedsegError, match=r"evaluate\.threshold is auto.*set a number"):
        evaluate_model(cfg, processed, tmp_path / "models" / "last.safetensors", tmp_path / "e2")
    with pytest.raises(MedsegError, match=r"evaluate\.threshold must be one of auto"):
        load_params(
            write_params(tmp_path / "x.yaml", tiny_params(evaluate={"threshold": "x"})),
            EvaluateConfig,
        )


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu avx2 avx512f avx512bw avx512_bf16", True),  # e.g. AMD Zen 4, Intel Cooper Lake
        ("fpu avx2 avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids
        ("fpu avx2 avx512f avx512bw", False),  # AVX-512 without bf16: emulated
        ("fpu avx2", False),
    ],
)
def test_amp_cpu_auto_takes_bf16_only_where_the_cpu_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str, native: bool
):
    from medseg.training import precision as loop

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert loop.cpu_bf16_native(info) is native
    assert loop.cpu_bf16_native(tmp_path / "absent") is False
    monkeypatch.setattr(loop, "cpu_bf16_native", lambda: native)
    cpu = torch.device("cpu")
    base = load_params(write_params(tmp_path / "p.yaml", tiny_params()), TrainConfig)
    for setting, want in (("auto", torch.bfloat16 if native else None), (True, torch.bfloat16),
                          (False, None)):  # fmt: skip
        assert loop.amp_dtype(dataclasses.replace(base, amp_cpu=setting), cpu) == want


class _EpochWeights(Callback):
    """A copy of the network's weights and the validation Dice at the end of every epoch."""

    def __init__(self) -> None:
        self.weights: list[dict[str, np.ndarray]] = []
        self.dice: list[float | None] = []

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        state = trainer.model.state_dict()
        self.weights.append({k: v.detach().cpu().numpy().copy() for k, v in state.items()})
        self.dice.append(record.get("val/dice"))


def test_best_weights_are_those_of_the_epoch_with_the_highest_validation_dice(
    processed: Path, tmp_path: Path
):
    seen = _EpochWeights()
    cfg = _cfg(tmp_path, epochs=4, patches_per_epoch=16, lr=1.0e-2)
    summary = fit(cfg, processed, tmp_path / "models", tmp_path / "logs", callbacks=[seen])
    dice = [d for d in seen.dice if d is not None]
    assert len(dice) == 4 and len(set(dice)) > 1  # the choice is a real one
    best = dice.index(max(dice))  # the first of equal best: a later tie does not replace it
    assert summary["best_epoch"] == best + 1 and summary["best_val_dice"] == max(dice)
    saved = load_file(tmp_path / "models" / "model.safetensors")
    for epoch, weights in enumerate(seen.weights):
        same = all(np.array_equal(saved[k], weights[k]) for k in saved)
        assert same == (epoch == best) or np.array_equal(
            np.concatenate([w.ravel() for w in weights.values()]),
            np.concatenate([w.ravel() for w in seen.weights[best].values()]),
        ), f"epoch {epoch + 1}: model.safetensors {'is' if same else 'is not'} its weights"
    last = load_file(tmp_path / "models" / "last.safetensors")
    assert all(np.array_equal(last[k], seen.weights[-1][k]) for k in last)


def test_training_learns_well_beyond_a_trivial_predictor(tmp_path: Path):
    """The real stages on a small synthetic set, a few epochs: the test Dice must be far above
    that of predicting every FOV pixel as vessel (the best constant predictor for Dice). A
    broken loss, a gradient with the wrong sign or labels fed misaligned would stay near or
    below it."""
    from medseg.config.sections import ConvertConfig, DataConfig, PreprocessConfig, SynthesizeConfig
    from medseg.convert.dataset import convert_dataset
    from medseg.evaluation.evaluate import evaluate_model
    from medseg.io.shards import CaseStore
    from medseg.preprocess.dataset import preprocess_dataset
    from medseg.synthetic import write_dataset

    params = write_params(
        tmp_path / "params.yaml",
        tiny_params(
            synthesize={"n_train": 6, "n_test": 2, "height": 128, "width": 120},
            train={
                "epochs": 5,
                "patches_per_epoch": 64,
                "batch_size": 8,
                "patch_size": 64,
                "lr": 3.0e-3,
            },
            evaluate={"window": 128},
        ),
    )
    write_dataset(load_params(params, SynthesizeConfig), tmp_path / "raw")
    convert_dataset(
        DataConfig(str(tmp_path / "raw"), "drive"), ConvertConfig(None, None), tmp_path / "c"
    )
    preprocess_dataset(load_params(params, PreprocessConfig), tmp_path / "c", tmp_path / "p")
    fit(load_params(params, TrainConfig), tmp_path / "p", tmp_path / "m", tmp_path / "l")
    metrics = evaluate_model(
        load_params(params, EvaluateConfig), tmp_path / "p", tmp_path / "m", tmp_path / "e"
    )
    test = CaseStore.open(tmp_path / "p", "test")
    fov = np.concatenate([test.get(i, "fov").ravel() > 0 for i in range(len(test))])
    truth = np.concatenate([test.get(i, "mask").ravel() > 0 for i in range(len(test))])
    share = truth[fov].mean()
    trivial = 2 * share / (1 + share)  # Dice of "all foreground" inside the FOV
    assert 0.1 < share < 0.5
    assert metrics["test"]["fov"]["dice"] >= trivial + 0.25, (
        metrics["test"]["fov"]["dice"],
        trivial,
    )
