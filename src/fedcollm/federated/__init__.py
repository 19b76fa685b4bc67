"""The Flower layer: it moves adapters between clients and server and calls the algorithm."""
