"""The evaluate stage (test-set scoring, tables, curves, overlays) and k-fold cross-validation."""
