from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.inference.postprocess import keep_largest
from medseg.inference.predictor import Predictor
from medseg.inference.runners import TorchRunner
from medseg.inference.window import WindowSettings, window_starts
from medseg.labels import LabelSpace


class PixelModel(torch.nn.Module):
    """A 1x1 convolution: its output at a pixel depends on that pixel only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        torch.nn.init.constant_(self.conv.weight, 2.0)
        torch.nn.init.constant_(self.conv.bias, -1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0
        return self.conv(x)


@pytest.mark.parametrize(("size", "window", "stride"), [(100, 64, 48), (64, 64, 48), (10, 64, 48)])
def test_window_starts_cover_everything(size: int, window: int, stride: int):
    starts = window_starts(size, window, stride)
    covered = np.zeros(max(size, window), bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered[:size].all() and starts[0] == 0


@pytest.mark.parametrize(("h", "w", "window"), [(70, 90, 32), (70, 90, 512), (33, 200, 64)])
def test_sliding_window_equals_direct_per_pixel_result(h: int, w: int, window: int):
    image = np.random.default_rng(0).normal(size=(1, h, w)).astype(np.float32)
    model = PixelModel().eval()
    settings = WindowSettings(window=window, overlap=0.5, batch_size=3)
    binary = LabelSpace.of(1)
    predictor = Predictor([TorchRunner(model)], binary, 0.5, settings)
    fov = np.ones((h, w), bool)
    probs = binary.foreground(predictor.predict(image, fov)[1])
    assert probs.shape == (h, w) and probs.dtype == np.float32
    expected = 1 / (1 + np.exp(-(2 * image[0] - 1)))
    assert np.allclose(probs, expected, atol=1e-5)


from medseg.inference.runners import prepare_model  # noqa: E402
from medseg.inference.window import blend_weights, predict_probabilities  # noqa: E402


class ConvModel(torch.nn.Module):
    """A 3x3 convolution (receptive field 3x3), fixed random weights, K output channels."""

    def __init__(self, classes: int = 1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_blend_weights():
    g = blend_weights(64, 96, "gaussian")
    assert g.shape == (64, 96) and float(g.max()) == pytest.approx(1.0, abs=1e-3)
    assert g.dtype == np.float32
    assert np.allclose(g, g[::-1]) and np.allclose(g, g[:, ::-1])  # symmetric
    assert float(g.min()) > 0.99e-6 and float(g[0, 32]) <= 1.01e-3  # rims count little, not 0
    assert np.array_equal(blend_weights(32, 32, "constant"), np.ones((32, 32)))
    with pytest.raises(ValueError, match="blending"):
        blend_weights(32, 32, "median")


@pytest.mark.parametrize("blending", ["gaussian", "constant"])
@pytest.mark.parametrize("tta", [False, True])
def test_per_pixel_model_is_exact_for_every_setting(blending: str, tta: bool):
    image = np.random.default_rng(1).normal(size=(1, 100, 130)).astype(np.float32)
    settings = WindowSettings(window=64, overlap=0.3, batch_size=5, blending=blending, tta=tta)
    probs = predict_probabilities(PixelModel().eval(), image, settings)
    assert probs.shape == (1, 100, 130)
    assert np.allclose(probs[0], 1 / (1 + np.exp(-(2 * image[0] - 1))), atol=1e-5)


def test_sliding_window_matches_whole_image_for_a_small_receptive_field():
    """A 3x3 model: windows that overlap by far more than its receptive field. Inside a window
    the output is exact; only the one-pixel rim of an inner window edge sees the zero padding,
    and the Gaussian weight (1e-3 at the rim) keeps that error below 1e-3."""
    image = np.random.default_rng(2).normal(size=(1, 150, 170)).astype(np.float32)
    model = ConvModel().eval()
    whole = predict_probabilities(model, image, WindowSettings(window=256))  # one window: all
    with torch.no_grad():
        direct = torch.sigmoid(model(torch.from_numpy(image)[None]))[0].numpy()
    assert np.allclose(whole, direct, atol=1e-6)
    tiled = predict_probabilities(model, image, WindowSettings(64, 0.5, blending="gaussian"))
    assert np.abs(tiled - whole).max() < 1e-3
    plain = predict_probabilities(model, image, WindowSettings(64, 0.5, blending="constant"))
    assert np.abs(plain - whole).max() > np.abs(tiled - whole).max()  # why gaussian is default


def test_tta_is_the_mean_over_flips():
    image = np.random.default_rng(3).normal(size=(1, 64, 64)).astype(np.float32)
    model = ConvModel(seed=4).eval()
    got = predict_probabilities(model, image, WindowSettings(window=64, tta=True))[0]
    x = torch.from_numpy(image)[None]
    expected = np.zeros((64, 64), np.float32)
    with torch.no_grad():
        for dims in ((), (-1,), (-2,), (-2, -1)):
            view = x.flip(dims) if dims else x
            out = torch.sigmoid(model(view))
            expected += (out.flip(dims) if dims else out)[0, 0].numpy() / 4
    assert np.allclose(got, expected, atol=1e-6)
    plain = predict_probabilities(model, image, WindowSettings(window=64))[0]
    assert not np.allclose(got, plain, atol=1e-3)


def test_multiclass_softmax_and_segment():
    image = np.random.default_rng(5).normal(size=(1, 40, 50)).astype(np.float32)
    settings = WindowSettings(window=32, overlap=0.5)
    probs = predict_probabilities(ConvModel(classes=3).eval(), image, settings)
    assert probs.shape == (3, 40, 50)
    assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    labels = LabelSpace.of(3).segment(probs, threshold=0.5)
    assert labels.dtype == np.uint8 and np.array_equal(labels, probs.argmax(axis=0))
    binary = LabelSpace.of(1).segment(probs[:1], threshold=0.3)
    assert np.array_equal(binary, (probs[0] >= 0.3).astype(np.uint8))
    runner = TorchRunner(ConvModel(classes=3).eval())
    with pytest.raises(ValueError, match="binary"):
        Predictor([runner], LabelSpace.of(1), 0.5, settings).predict(image, np.ones((40, 50), bool))


def test_prepare_model_folds_batchnorm_and_keeps_outputs():
    from medseg.model import build_model
    from medseg.spec import ModelSpec

    torch.manual_seed(0)
    model = build_model(ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], 1, 1)).eval()
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fast = prepare_model(model, in_channels=1)
    norms = [m for m in fast.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms == []  # every norm of this network follows a convolution
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # not in place
    x = torch.randn(2, 1, 96, 128)
    with torch.inference_mode():
        assert torch.allclose(fast(x), model(x), atol=1e-4)


def test_prepare_model_keeps_a_norm_that_does_not_follow_its_convolution():
    class Branches(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(2)  # registered next, applied to another branch
            self.other = torch.nn.Conv2d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.norm(self.other(x))

    model = Branches().eval()
    model.norm.running_mean.fill_(3.0)
    model.norm.running_var.fill_(4.0)
    fast = prepare_model(model, in_channels=1)
    assert isinstance(fast.norm, torch.nn.BatchNorm2d)  # the check caught the wrong pairing
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(fast(x), model(x), atol=1e-6)


def test_label_space_binary_and_named_classes():
    binary, classes = LabelSpace.of(1), LabelSpace.of(3, ["background", "disc", "vessel"])
    assert (binary.activation, classes.activation) == ("sigmoid", "softmax")
    assert binary.names == ("background", "foreground") and not binary.named
    assert LabelSpace.of(1, ["background", "liver"]).named and classes.named
    assert LabelSpace.of(3).names == ("background", "class_1", "class_2")
    assert (binary.foreground_labels, classes.foreground_labels) == ([1], [1, 2])
    assert (binary.map_suffixes, classes.map_suffixes) == ([""], ["_class1", "_class2"])
    with pytest.raises(ValueError, match="need 3 names"):
        LabelSpace.of(3, ["background", "disc"])
    probs = np.array([[[0.7, 0.1]], [[0.2, 0.3]], [[0.1, 0.6]]], np.float32)  # (3, 1, 2)
    inside = np.array([[True, False]])
    assert np.allclose(classes.foreground(probs), [[0.3, 0.9]])
    assert classes.segment(probs, 0.5).tolist() == [[0, 2]]
    assert classes.segment(probs, 0.5, inside).tolist() == [[0, 0]]
    assert binary.mask_image(np.array([[0, 1]], np.uint8)).tolist() == [[0, 255]]
    classes.clear_outside(probs, inside)  # nothing claimed outside: all background
    assert probs[:, 0, 1].tolist() == [1.0, 0.0, 0.0] and probs[1, 0, 0] == np.float32(0.2)
    one = np.array([[[0.4, 0.8]]], np.float32)
    binary.clear_outside(one, inside)
    assert one.tolist() == [[[pytest.approx(0.4), 0.0]]]


def test_predictor_scores_at_the_truth_size_and_averages_an_ensemble():
    image = np.random.default_rng(6).normal(size=(1, 40, 50)).astype(np.float32)
    fov = np.ones((40, 50), bool)
    out_fov = np.zeros((80, 100), bool)
    out_fov[10:70, 10:90] = True
    space, settings = LabelSpace.of(3), WindowSettings(window=32)
    runners = [TorchRunner(ConvModel(classes=3, seed=s).eval()) for s in (7, 8)]
    ensemble = Predictor(runners, space, 0.5, settings)
    members = ensemble.member_probabilities(image, fov, out_fov)
    assert [m.shape for m in members] == [(3, 80, 100)] * 2
    labels, mean = ensemble.predict(image, fov, out_fov)
    assert np.allclose(mean, (members[0] + members[1]) / 2, atol=1e-7)
    assert (mean[0][~out_fov] == 1.0).all() and (labels[~out_fov] == 0).all()
    assert np.array_equal(labels[out_fov], mean.argmax(axis=0)[out_fov])
    alone = Predictor(runners[:1], space, 0.5, settings).predict(image, fov, out_fov)[1]
    assert np.array_equal(alone, members[0])
    with pytest.raises(ValueError, match="resolve it first"):
        Predictor(runners, space, "auto", settings)  # type: ignore[arg-type]


def test_threshold_auto_is_resolved_once_from_the_bundles(tmp_path):
    from conftest import make_bundle

    from medseg.errors import MedsegError
    from medseg.inference.bundle import load_bundle
    from medseg.inference.predictor import resolve_threshold
    from medseg.spec import ModelSpec

    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], 1, 1)
    a = load_bundle(make_bundle(tmp_path / "a", spec, threshold=0.3), "cpu")
    b = load_bundle(make_bundle(tmp_path / "b", spec, threshold=0.6), "cpu")
    none = load_bundle(make_bundle(tmp_path / "n", spec), "cpu")
    assert resolve_threshold(0.42, [none]) == 0.42  # a number stays
    assert resolve_threshold("auto", [a]) == 0.3
    assert resolve_threshold("auto", [a, b]) == pytest.approx(0.45)  # an ensemble: the mean
    assert resolve_threshold("auto", [none], fallback=0.5) == 0.5
    with pytest.raises(MedsegError, match=r"evaluate\.threshold is auto.*set a number"):
        resolve_threshold("auto", [a, none])
    predictor = Predictor.from_bundles([a, b], WindowSettings(window=64), "auto")
    assert predictor.threshold == pytest.approx(0.45) and len(predictor.runners) == 2
    multi = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], 1, 3)
    names = ["background", "disc", "vessel"]
    c = load_bundle(make_bundle(tmp_path / "c", multi, names=names), "cpu")
    assert resolve_threshold("auto", [c]) == 0.5  # several classes: not used
    assert c.labels == LabelSpace.of(3, names)
    with pytest.raises(MedsegError, match="same outputs and classes"):
        Predictor.from_bundles([a, c], WindowSettings(window=64), 0.5)


def test_predictor_post_processes_labels_and_leaves_probabilities_alone():
    image = np.zeros((1, 30, 40), np.float32)
    image[0, 5:20, 5:20] = 1.0  # the organ
    image[0, 24:27, 30:33] = 1.0  # a separate speck
    fov = np.ones((30, 40), bool)
    out_fov = np.ones((60, 80), bool)  # the truth's resolution: the steps apply there
    out_fov[:, 76:] = False
    runner, space = TorchRunner(PixelModel().eval()), LabelSpace.of(1)
    raw = Predictor([runner], space, 0.5, WindowSettings(window=64))
    kept = Predictor([runner], space, 0.5, WindowSettings(window=64), {1: [{"op": "keep_largest"}]})
    labels, probs = raw.predict(image, fov, out_fov)
    largest, same = kept.predict(image, fov, out_fov)
    assert np.array_equal(probs, same)  # probabilities (AUC, curves) stay as they were
    assert labels[50, 63] == 1 and largest[50, 63] == 0  # the speck, at the output's size
    assert np.array_equal(largest, keep_largest(labels == 1).astype(np.uint8))
    assert (labels[:, 76:] == 0).all() and (largest[:, 76:] == 0).all()
    filled = Predictor([runner], space, 0.5, postprocess={1: [{"op": "fill_holes"}]})
    ring = np.ones((1, 8, 8), np.float32)
    ring[0, 3:5, 3:5] = 0.0
    inside = np.ones((8, 8), bool)
    inside[3, 3] = False  # a hole the FOV leaves out stays background once filled
    filled_labels = filled.segment(filled.mean(filled.member_probabilities(ring, inside)), inside)
    assert filled_labels.sum() == 63 and filled_labels[3, 3] == 0


def test_an_ensemble_post_processes_only_when_its_models_agree(tmp_path, caplog):
    from conftest import make_bundle

    from medseg.inference.bundle import load_bundle
    from medseg.spec import ModelSpec

    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], 1, 1)
    largest = {1: [{"op": "keep_largest"}]}
    a = load_bundle(make_bundle(tmp_path / "a", spec, postprocess=largest), "cpu")
    b = load_bundle(make_bundle(tmp_path / "b", spec, seed=1, postprocess=largest), "cpu")
    c = load_bundle(
        make_bundle(tmp_path / "c", spec, postprocess={1: [{"op": "fill_holes"}]}), "cpu"
    )
    none = load_bundle(make_bundle(tmp_path / "n", spec), "cpu")
    settings = WindowSettings(window=64)
    caplog.clear()
    assert Predictor.from_bundles([a], settings, 0.5).postprocess == largest
    assert Predictor.from_bundles([a, b], settings, 0.5).postprocess == largest
    assert Predictor.from_bundles([none, none], settings, 0.5).postprocess == {}
    assert "post-processing" not in caplog.text
    for mixed in ([a, c], [a, none]):
        caplog.clear()
        assert Predictor.from_bundles(mixed, settings, 0.5).postprocess == {}
        assert "chose different post-processing" in caplog.text and "applies none" in caplog.text
