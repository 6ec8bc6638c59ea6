"""price_fusion studies: the IKEA real-data benchmark and its comparisons, and the structural-feature ablation."""
