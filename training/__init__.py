"""Model side of popscore: the fusion CNN, synthetic data, training and TorchScript export.

Serving code only needs `training.export.load_artifact` and `training.features.extract`;
everything else here exists to build and check the artifact described in CONTRACT §9.
"""
