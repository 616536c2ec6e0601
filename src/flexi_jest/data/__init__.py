"""Benchmark data the project makes offline, and the webdataset shard reader/writer."""
