"""Stavily Orchestrator: the central server of the Stavily automation platform."""

__version__ = "0.1.0"
