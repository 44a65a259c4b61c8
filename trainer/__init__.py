"""The one training loop, framework-free: it drives a hal.Backend and never imports jax or torch."""
