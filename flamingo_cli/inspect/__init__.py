"""`inspect-shards`: shard scanning and checks, the report model, and the HTML preview."""
