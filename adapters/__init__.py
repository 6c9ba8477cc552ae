"""Integrations of streamcoke with other libraries (imported as ``streamcoke.adapters``)."""
