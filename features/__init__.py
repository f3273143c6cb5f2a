"""The feature engine: specs, aggregation algebra, tiling, stores. No Bytewax, torch or web imports."""
