"""Compute: runs token-processing kernels over each batch and appends their columns (docs/compute.md)."""
