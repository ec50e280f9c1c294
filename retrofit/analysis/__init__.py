"""Analysis: FLOPs and parameter counts, the results table, figures and reports."""
