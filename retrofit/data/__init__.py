"""Training data: the packed-row format, packing, parquet shards, the resumable streams the trainer
reads, dataset mixing and the bundled synthetic corpus."""
