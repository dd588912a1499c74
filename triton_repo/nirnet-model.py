"""A part of the NIRNet ensemble on Triton's Python backend: the shared implementation, configured by this model's config.pbtxt."""

from streamguard.triton.nirnet_model import TritonPythonModel  # noqa: F401 - Triton looks the class up here
