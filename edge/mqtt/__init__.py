"""Results out over MQTT: a disk-backed outbox and the link that drains it to the broker."""
