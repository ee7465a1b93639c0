"""Raw downloads to training shards: `mmc4` (interleaved documents) and `laion` (pairs)."""
