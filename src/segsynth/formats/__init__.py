"""On-disk formats: one module per file kind, each reading, writing and validating it (stages import these, never each other)."""
