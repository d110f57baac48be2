"""The preprocess stage: transforms of one image, the split, the processed case stores and their
reader."""
