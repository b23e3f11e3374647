"""Learnable edit regions (arXiv 2505.19352): region predictor, its losses, descriptive texts and training."""
