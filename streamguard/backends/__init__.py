"""Detector backends. Each implements `streamguard.detectors.spec.DetectorBackend`."""
