"""Concept methods, one folder each (methods/<name> in the source tree)."""
