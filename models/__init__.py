"""Model specs (framework-free) and their JAX (Flax) and PyTorch implementations."""
