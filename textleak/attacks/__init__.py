"""Text gradient-inversion attacks: TAG and LAMP (DAGER lives in dager.py)."""
