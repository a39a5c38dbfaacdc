"""Retrieval and classification metrics, reports."""
