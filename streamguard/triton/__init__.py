"""Triton model repositories for the built-in detectors (the Python-backend deployment of `univfd`)."""

from streamguard.triton.build import BuildResult, build_repository

__all__ = ["BuildResult", "build_repository"]
