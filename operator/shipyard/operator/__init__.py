"""Shipyard's Kubernetes operator (Kopf). Importing this package does no I/O and never imports torch."""
