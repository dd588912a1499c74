"""Detectors: the typed descriptor plugins register, and the runner that calls each in isolation."""
