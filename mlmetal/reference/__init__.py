"""Float64 numpy references of every op, one module per kernel family (like kernels/)."""
