"""Kernels written by hand where neither torch nor torchao has one for this CPU (native.py says which and why)."""
