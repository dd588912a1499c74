"""A built-in detector on Triton's Python backend: the shared model, configured by this model's config.pbtxt."""

from streamguard.triton.python_model import TritonPythonModel  # noqa: F401 - Triton looks the class up here
