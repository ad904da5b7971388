"""Forward solvers: pure functions on batched tensors (no module state, no DSL)."""
