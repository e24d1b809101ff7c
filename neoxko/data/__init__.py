"""The Korean data pipeline: PII replacement, cleaning, filtering, deduplication, packing."""
