"""Baselines of the paper's tables (spec §5.3, §5.4) on GLAD's backbone, as `Detector`s."""

from glad.baselines.mahaad import MahaAD
from glad.baselines.padim import PaDiM

__all__ = ["MahaAD", "PaDiM"]
