"""The `stavily` command."""
