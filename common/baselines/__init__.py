"""The generic continuous-input gradient-matching baselines (DLG, iDLG, Inverting Gradients),
kept apart from the shared layer's core (``common``'s modules never import this package)."""
from .gradient_matching import DLG, IDLG, GradientMatchingAttack, GradientMatchingConfig, InvertingGradients

__all__ = ["DLG", "IDLG", "GradientMatchingAttack", "GradientMatchingConfig", "InvertingGradients"]
