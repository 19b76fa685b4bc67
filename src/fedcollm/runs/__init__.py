"""Launchers: simulation (Flower's simulation engine), and later deployment and experiments."""
