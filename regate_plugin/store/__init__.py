"""The reference store: per-answer-token reference losses on disk or in memory, and the precompute's directory."""
