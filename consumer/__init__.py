"""The popscore service: Kafka in, audio decode, TorchScript fusion CNN, Redis and Kafka out."""
