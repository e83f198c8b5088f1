"""Downstream protocols on frozen features (``python -m densessl.evaluation``): linear-probe segmentation and depth, video
mask propagation, baselines through the same feature extractors, figures, and weight export."""
