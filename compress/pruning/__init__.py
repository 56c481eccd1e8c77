"""Pruning: which channels go, and a model that really shrinks."""
