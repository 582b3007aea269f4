"""What learns: the label-quality estimator, label degradations, segmentation networks and training."""
