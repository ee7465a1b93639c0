"""Rebuild recipes/tiny-data, the small shards the bundled tiny recipe trains on."""

from pathlib import Path

from flamingo_cli.synthetic import write_dataset

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent / "recipes" / "tiny-data"
    write_dataset("laion", root / "laion", shards=2, per_shard=32)
    write_dataset("mmc4", root / "mmc4", shards=2, per_shard=16)
