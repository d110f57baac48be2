"""Every name a params key may take, the file names stages hand on, and the bounds the schema
and a saved model share. Torch-free and import-free, so that the params schema
(`medseg.config`) checks every choice without importing what implements it.

Each registry is built from, or checked against, its list here (``tests/test_names.py``): the
architectures of `medseg.model`, the losses of `medseg.training.losses`, the optimizers and
schedules of `medseg.training.optim`, the blendings of the sliding window, the layouts of
`medseg.io.layouts`, the caches of `medseg.training.cache`.
"""

from __future__ import annotations

# --- data ---
LAYOUTS = ("drive", "folders", "manifest")  # data.layout: medseg.io.layouts.scan_cases
LABEL_SETS = ("vessels", "vessels_disc")  # synthesize.labels: binary, or 1 vessel + 2 disc

# --- convert ---
MULTIFRAMES = ("split", "refuse")  # convert.multiframe
ID_NAMES = ("source", "hash")  # convert.names: the path, or its keyed hash
# convert.fov_fallback: medseg.convert.fov; auto: convert makes the thresholded FOV where it can,
# the plan decides whether preprocess uses it (a photograph's black surround) or the whole image
FOV_FALLBACKS = ("auto", "threshold", "whole_image")
ON_ERRORS = ("fail", "skip")  # convert.on_error
BIT_DEPTHS = (8, 16)  # convert.max_bit_depth

# --- preprocess ---
CHANNELS = (
    "green",
    "gray",
    "rgb",
)  # preprocess.channel: medseg.preprocess.transforms.select_channel
CONTRASTS = ("none", "clahe")  # preprocess.contrast

# --- train ---
# train.arch: lower-case segmentation-models-pytorch class names (medseg.model builds them)
ARCHS = (
    "unet",
    "unetplusplus",
    "manet",
    "linknet",
    "fpn",
    "pspnet",
    "deeplabv3",
    "deeplabv3plus",
    "pan",
    "upernet",
    "segformer",
)
# train.encoder: the shape of a segmentation-models-pytorch encoder name; which names exist is
# known only to smp (it imports torch), so the train stage checks that (medseg.model.check_names)
ENCODER_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
LOSSES = ("bce", "dice", "bce_dice", "cldice")  # train.loss: medseg.training.losses.LOSSES
OPTIMIZERS = ("adam", "adamw")  # train.optimizer: medseg.training.optim.OPTIMIZERS
SCHEDULES = ("constant", "cosine", "poly")  # train.schedule: medseg.training.optim.lr_factor
CACHES = ("auto", "ram", "none", "device")  # train.cache: medseg.training.cache
DEVICES = ("auto", "cpu", "cuda", "mps")  # train.device, evaluate.device, medseg predict --device

# --- evaluate ---
BLENDINGS = ("gaussian", "constant")  # evaluate.blending: weights of overlapping windows
AUTO = "auto"  # evaluate.threshold and train.amp_cpu: decided from the model or the machine
BOUNDARY_UNITS = (AUTO, "px", "mm")  # evaluate.boundary_unit

# --- the plan (medseg.planning.plan; its keys: medseg.planning.settings) ---
PLAN_FILE = "plans.json"

# --- files one stage writes and a later one (or a model bundle) reads ---
# The convert params as the convert stage used them, carried on (preprocess, then train copies
# it beside the weights) so that `medseg predict` reads new images with the same DICOM window
# and makes a missing FOV the same way.
CONVERT_RECORD = "convert.json"
# The class names in label order, background first, written by convert and carried on likewise
# (the data's labels for train, the metrics' names for evaluate).
CLASSES = "classes.json"
PREPROCESS_RECORD = "preprocess.json"  # the preprocess params, for `medseg predict`

# --- bounds on the network's size, shared by the params schema and a saved model's spec:
# far above any useful value, far below one that would allocate memory for hours ---
MAX_DECODER_BLOCKS = 8
MAX_DECODER_WIDTH = 4096
MAX_CLASSES = 256  # background + the 255 classes data.classes allows
