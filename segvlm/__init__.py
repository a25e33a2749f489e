"""SegVLM model library."""
