"""Serving endpoint: retrieval, hydration, ranking, forward logging (step 6)."""
