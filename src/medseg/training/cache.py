"""Where the training cases live while a run cuts patches from them (``train.cache``).

- ``none``: memory-mapped shards; patches are cut on the host (or in DataLoader workers, which
  feed pinned batches to a GPU).
- ``ram``: the shards read into host memory once; patches cut on the host as with ``none``.
- ``device``: the cases copied once into flat tensors on the training device; each step's
  patches are gathered there by index arithmetic (`DevicePatchSampler`), so a GPU never waits
  for the host inside a step. On a CPU device it gives the same patches as the host samplers.
- ``auto``: ``device`` on CUDA when the split takes at most `DEVICE_CACHE_SHARE` of the free
  GPU memory; otherwise ``ram`` when it fits the RAM budget, else ``none``.

The patches are bit-identical whichever mode cuts them: the epoch's plan is drawn on the host
from the same generator by `PatchSampler.plan` in every mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg.config.sections import TrainConfig
from medseg.errors import MedsegError
from medseg.io.shards import CaseStore
from medseg.names import CLASSES
from medseg.preprocess.processed import open_split, read_class_names
from medseg.training.data import Augmentation, Batch, PatchSampler, Plan, augment_dihedral

# auto: the training cases are read into RAM when they take at most this share of the memory
# available now (and at most RAM_CACHE_MAX bytes); else they stay memory-mapped.
RAM_CACHE_SHARE = 0.25
RAM_CACHE_MAX = 1 << 30
# auto on CUDA: the cases go to the GPU when they take at most this share of its free memory
# (the rest is for the network's activations, which grow with batch and patch size).
DEVICE_CACHE_SHARE = 0.25
# the arrays a device cache holds (the per-row counts stay on the host, for drawing plans)
DEVICE_ARRAYS = ("image", "mask", "fov")


def choose_cache(
    cfg: TrainConfig, data_dir: str | Path, device: torch.device, processes: int = 1
) -> str:
    """The cache mode a run uses: ``train.cache``, or what ``auto`` picks (module docstring).

    Each of the ``processes`` of a distributed run holds its own copy: in RAM they share the
    budget (counted as if all ran on one machine); on CUDA each has its own GPU.

    Raises:
        MedsegError: ``train.cache: device`` on a GPU with too little free memory.
    """
    store = open_split(data_dir, "train")
    if cfg.cache == "device":
        _check_fits(store, device)
    if cfg.cache != "auto":
        return cfg.cache
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if store.nbytes(DEVICE_ARRAYS) <= DEVICE_CACHE_SHARE * free:
            return "device"
    size = store.nbytes() * processes
    return "ram" if size <= min(RAM_CACHE_SHARE * available_memory(), RAM_CACHE_MAX) else "none"


def _check_fits(store: CaseStore, device: torch.device) -> None:
    if device.type != "cuda":
        return
    need, (free, _) = store.nbytes(DEVICE_ARRAYS), torch.cuda.mem_get_info(device)
    if need > free // 2:
        raise MedsegError(
            f"params: train.cache is device, but the training split needs {need / 2**30:.2f} "
            f"GiB and {device} has {free / 2**30:.2f} GiB free; set train.cache to auto or ram"
        )


def available_memory() -> int:
    """Bytes of host memory available now (``MemAvailable``; all of it where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class DevicePlan:
    """A `Plan` with every array a tensor on the device (copied once per epoch); shapes and
    meanings as `Plan`, integers int64, flips bool."""

    image: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    quarter_turns: torch.Tensor
    flip: torch.Tensor
    theta: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    gamma: torch.Tensor

    @classmethod
    def upload(cls, plan: Plan, device: torch.device) -> DevicePlan:
        """``plan``'s arrays on ``device``."""
        return cls(*(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in _fields(plan)))

    def __len__(self) -> int:
        return len(self.image)


def _fields(plan: Plan) -> list[np.ndarray]:
    return [
        plan.image, plan.top, plan.left, plan.quarter_turns, plan.flip, plan.theta,
        plan.brightness, plan.contrast, plan.gamma,
    ]  # fmt: skip


class DevicePatchSampler(PatchSampler):
    """`PatchSampler` over cases held on a device: plans are drawn on the host as there, and
    uploaded once per epoch; each step's crops are one gather from the flat case tensors.

    The cases are laid end to end, each row-major at its own size: ``image`` (C, N) float32,
    ``mask`` and ``fov`` (N,) uint8, N the pixels of all cases; case i starts at ``offsets[i]``.
    A crop pixel (row r, column c) of case i is element ``offsets[i] + r * width[i] + c``; the
    90-degree turns and the flip map each output pixel to its window pixel through tables made
    once by `augment_dihedral` itself, and pixels outside the case are set to 0 as the host
    sampler pads them.

    Args:
        device: where the cases, plans and batches live.
        Others: as `PatchSampler`; ``store`` is read once here, then only to draw plans.
    """

    def __init__(
        self,
        store: CaseStore,
        patch_size: int,
        foreground_fraction: float,
        rng: np.random.Generator,
        aug: Augmentation | None = None,
        n_labels: int = 2,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(store, patch_size, foreground_fraction, rng, aug, n_labels)
        self.device = torch.device(device)
        sizes = np.array(self.sizes, dtype=np.int64).reshape(-1, 2)
        pixels = sizes[:, 0] * sizes[:, 1]
        starts = np.concatenate([[0], np.cumsum(pixels)[:-1]]).astype(np.int64)
        self.offsets = torch.from_numpy(starts).to(self.device)
        self.heights = torch.from_numpy(sizes[:, 0].copy()).to(self.device)
        self.widths = torch.from_numpy(sizes[:, 1].copy()).to(self.device)
        total = int(pixels.sum())
        self.images = torch.empty((self.channels, total), dtype=torch.float32, device=self.device)
        self.masks = torch.empty(total, dtype=torch.uint8, device=self.device)
        self.fovs = torch.empty(total, dtype=torch.uint8, device=self.device)
        for i, (start, n) in enumerate(zip(starts.tolist(), pixels.tolist(), strict=True)):
            part = slice(start, start + n)
            self.images[:, part] = _tensor(store.get(i, "image").reshape(self.channels, n))
            self.masks[part] = _tensor(store.get(i, "mask").reshape(n))
            self.fovs[part] = _tensor(store.get(i, "fov").reshape(n))
            store.release(i)
        # where each pixel of a turned and mirrored window comes from, for the 8 (turns, flip)
        # pairs: the host's own transform applied to the grids of row and column numbers
        s = self.context
        rows, cols = np.mgrid[:s, :s]
        pairs = [(k, f) for k in range(4) for f in (False, True)]
        self._from_row = torch.from_numpy(
            np.stack([augment_dihedral(rows, k, f) for k, f in pairs]).astype(np.int64)
        ).to(self.device)
        self._from_col = torch.from_numpy(
            np.stack([augment_dihedral(cols, k, f) for k, f in pairs]).astype(np.int64)
        ).to(self.device)

    def plan(self, steps: int, batch_size: int) -> DevicePlan:  # type: ignore[override]
        """`PatchSampler.plan`, drawn on the host from the same generator, on the device."""
        return DevicePlan.upload(super().plan(steps, batch_size), self.device)

    def crop(self, plan: Plan | DevicePlan, step: int, share: slice = slice(None)) -> Batch:
        """The patches of one step (those in ``share``), on the device; equal bit for bit to
        `PatchSampler.crop` of the same plan.

        Returns:
            A `Batch` on the device; image (n, C, S, S) float32, mask and fov (n, 1, S, S).
        """
        if isinstance(plan, Plan):
            plan = DevicePlan.upload(plan, self.device)
        idx = torch.arange(plan.image.shape[1], device=self.device)[share]
        flat, inside = self._indices(plan, step, idx)
        n, s = len(idx), self.context
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        x = self.images[:, flat.view(-1)].view(self.channels, n, s, s).transpose(0, 1)
        x = torch.where(inside[:, None], x, zero).contiguous()
        y = torch.where(inside, self.masks[flat].float(), zero)[:, None]
        v = torch.where(inside, self.fovs[flat].float(), zero)[:, None]
        return Batch(
            x, y, v, plan.theta[step, idx], plan.brightness[step, idx],
            plan.contrast[step, idx], plan.gamma[step, idx],
        )  # fmt: skip

    def _indices(
        self, plan: DevicePlan, step: int, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat element index (n, S, S) int64 of every crop pixel and whether it is inside
        its case (n, S, S) bool."""
        margin = (self.context - self.patch_size) // 2
        case = plan.image[step, idx]
        pair = plan.quarter_turns[step, idx] * 2 + plan.flip[step, idx].long()
        h, w = self.heights[case].view(-1, 1, 1), self.widths[case].view(-1, 1, 1)
        r = self._from_row[pair] + (plan.top[step, idx] - margin).view(-1, 1, 1)
        c = self._from_col[pair] + (plan.left[step, idx] - margin).view(-1, 1, 1)
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        r, c = torch.minimum(r.clamp_min(0), h - 1), torch.minimum(c.clamp_min(0), w - 1)
        return self.offsets[case].view(-1, 1, 1) + r * w + c, inside


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A host tensor of a read-only store array (copied: torch wants writable memory)."""
    return torch.from_numpy(np.array(a))


def make_sampler(
    store: CaseStore,
    cfg: TrainConfig,
    rng: np.random.Generator,
    n_labels: int,
    device: torch.device | None = None,
) -> PatchSampler:
    """The patch sampler of a run: on ``device`` when given (``train.cache: device``), else
    cutting on the host from ``store``; patch size, foreground share and augmentation from
    the ``train.*`` params."""
    aug = Augmentation.from_config(cfg)
    args = (store, cfg.patch_size, cfg.foreground_fraction, rng, aug, n_labels)
    if device is None:
        return PatchSampler(*args)
    return DevicePatchSampler(*args, device=device)


@dataclass(frozen=True)
class TrainingData:
    """The preprocess stage's output as a run reads it.

    Attributes:
        dir: the preprocess stage's output folder.
        train, val: the case stores of the two splits (``val`` may be empty).
        cache: where the training cases live (`medseg.training.cache.choose_cache`).
        class_names: the label names, background first.
    """

    dir: Path
    train: CaseStore
    val: CaseStore
    cache: str
    class_names: list[str]

    @classmethod
    def open(
        cls, cfg: TrainConfig, data_dir: str | Path, device: torch.device, processes: int = 1
    ) -> TrainingData:
        """Open the splits in ``data_dir`` where ``train.cache`` puts them.

        Raises:
            MedsegError: no training cases, or ``train.classes`` does not fit the labels.
        """
        data_dir = Path(data_dir)
        cache = choose_cache(cfg, data_dir, device, processes)
        train = open_split(data_dir, "train", ram=cache == "ram")
        val = open_split(data_dir, "val")
        if len(train) == 0:
            raise MedsegError(f"{data_dir / 'train.json'}: no training cases")
        names = read_class_names(data_dir)
        _check_classes(cfg, names, data_dir)
        return cls(data_dir, train, val, cache, names)


def _check_classes(cfg: TrainConfig, names: list[str], data_dir: Path) -> None:
    """``train.classes`` must fit the labels the data has (``classes.json``)."""
    n = len(names)
    if cfg.classes == n or (n == 2 and cfg.classes == 1):
        return
    want = "1 (sigmoid) or 2 (softmax)" if n == 2 else str(n)
    raise MedsegError(
        f"params: train.classes is {cfg.classes} but the data ({data_dir / CLASSES}) has {n} "
        f"labels ({', '.join(names)}); set train.classes to {want}"
    )
