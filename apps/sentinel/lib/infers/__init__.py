from .segmentation import Segmentation  # noqa: F401
