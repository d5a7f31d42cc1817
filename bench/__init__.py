"""``popscore bench`` (CONTRACT §11): compute ceiling, end to end through Kafka + Redis, naive."""
