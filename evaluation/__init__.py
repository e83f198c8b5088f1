"""Downstream protocols on frozen features (``python -m evaluation``): linear-probe segmentation and depth, video
mask propagation, baselines through the same feature extractors, figures, and weight export."""
