"""Golden outputs of the official code (tests/golden/README.md): fixtures, seeded weights and the shared loader."""
