"""Fixtures that build tiny real models on the fly (owned by the models/generation work)."""
