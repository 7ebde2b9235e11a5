"""Text gradient-inversion attacks: TAG and LAMP (DAGER is the package dager/)."""
