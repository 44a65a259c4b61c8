"""Entry points: Hydra apps (train), data preparation, and (later) cluster launch templates."""
