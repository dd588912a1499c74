"""Built-in detectors. Each is a plugin module loaded like any third-party plugin (see `plugins.py`)."""
