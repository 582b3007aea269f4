"""What decides: scoring, ranking, budgets, pseudo-label selection and label-error flags.

Plain functions and classes over arrays and records; only the ``monailabel_*`` adapter modules import
MONAI Label.
"""
