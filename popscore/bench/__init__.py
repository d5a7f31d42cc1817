"""``popscore bench``: the compute ceiling, end to end through Kafka and Redis, the naive
consumer, the soak, and the GPU check (docs/PERFORMANCE.md; JSON shape in docs/INTERFACE.md).
"""
