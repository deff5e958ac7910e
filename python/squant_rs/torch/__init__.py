"""The torch side: the adapter that validates torch tensors and routes them
(CPU tensors to the Rust core, zero-copy; CUDA tensors to the backend), and
the vectorized torch implementation of CASE rounding (``backend``).

Imported lazily by the tensor API, so ``import squant_rs`` works without
torch."""
