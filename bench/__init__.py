"""The benchmark suite behind `make bench`: overhead, privacy cost, quality, traffic and scale."""
