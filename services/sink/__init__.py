"""The sink: cost records from Kafka into ClickHouse."""
