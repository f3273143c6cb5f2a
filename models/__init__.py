"""Models: two-tower retrieval, L1/L2 rankers, ONNX export, HNSW index, registry (step 5)."""
