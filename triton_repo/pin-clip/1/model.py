"""pin-clip on Triton's Python backend: the shared built-in detector model, configured by config.pbtxt."""

from streamguard.triton.python_model import TritonPythonModel  # noqa: F401 - Triton looks the class up here
