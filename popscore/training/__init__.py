"""The model side: the fusion CNN, synthetic data, training, grouped evaluation and the demo
artifact. What serving needs of a model (its file format, feature order and frontend) lives in
``popscore.artifact``; this package builds artifacts and never runs in the service.
"""
