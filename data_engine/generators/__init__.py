"""Generators of offline and synthetic text, beside the data engine's steps (ingest, dedup,
quality, domains, difficulty in data_engine/): the demo corpus (real offline text, synthetic
domain text, planted noise), the dedup benchmark's corpus of controlled near-duplicates, and
the verifiable reasoning tasks (families, worked solutions, checkers)."""
