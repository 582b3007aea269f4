"""Label Sentinel: label-quality estimation and quality-driven annotation for MONAI Label.

Subpackages:
- ``labelsentinel.models``: what learns (quality estimator, label degradations, segmentation networks).
- ``labelsentinel.strategies``: what decides (scoring, ranking, budgets, pseudo-label selection).
"""

__version__ = "0.1.0"
