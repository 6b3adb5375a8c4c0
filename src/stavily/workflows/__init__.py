"""Workflows: definitions and versions, executions, step runs and their instructions."""
