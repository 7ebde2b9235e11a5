"""A 2-client Flower federation on Adult rows, captured for ``python -m eval audit`` (see README.md)."""
