"""Wire contracts: Avro schemas of every topic and the Confluent-framed codec."""
