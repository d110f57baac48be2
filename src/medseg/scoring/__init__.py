"""Scores of predictions against ground truth: confusion counts and scores, boundary distances,
lesion-wise detection, the tally shared by validation, evaluate and crossval. No stage code."""
