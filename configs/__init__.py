"""Hydra config tree (a package so it is found wherever trichip is installed: pkg://configs)."""
