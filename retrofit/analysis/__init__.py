"""Analysis: the results table, figures and reports (FLOPs and parameter counts: retrofit/train/flops.py,
the same counting the training loop logs)."""
