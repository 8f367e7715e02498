"""Shipyard's runtime: the model compression job and the inference server (imports torch lazily per command)."""
