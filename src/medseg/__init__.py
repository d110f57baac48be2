"""medseg: reproducible 2D medical image segmentation on DVC."""

__version__ = "0.1.0"
