"""Evaluation: validation loss over recurrence depth, with or without an adaptive exit."""
