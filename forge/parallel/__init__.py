"""Tensor-parallel building blocks. Process groups are always passed in explicitly."""
