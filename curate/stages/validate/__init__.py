"""Validation: train a small CLIP on curated (and unfiltered) shards, then evaluate it."""
