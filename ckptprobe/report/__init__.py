"""Presentation: tables, JSON and CSV output, figures."""
