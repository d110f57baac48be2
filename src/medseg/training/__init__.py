"""The train stage: `fit` runs it; its parts can be used on their own.

- `medseg.training.loop`: `fit`, the `Trainer` (the epoch and step loop, checkpoint and resume,
  AMP, DDP).
- `medseg.training.validation`: whole-image validation, scored as evaluate scores.
- `medseg.training.postchoice`: the post-processing chosen on validation after training, for
  the bundle.
- `medseg.training.cache`: where the training cases live (``train.cache``) and the patch sampler
  that cuts on the device.
- `medseg.training.optim`: optimizer and learning-rate schedule by name.
- `medseg.training.callbacks`: the hooks of the loop, and the per-epoch curves.

The losses are in `medseg.training.losses`, the augmentation in `medseg.training.data`, checkpoints
in `medseg.training.checkpoint`, process groups in `medseg.training.distributed`.
"""
