"""What several services need: topics and keys, codec, errors, settings, Kafka plumbing, the client."""
