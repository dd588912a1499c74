"""Content credentials: the built-in ``credentials`` detector, which verifies C2PA manifests.

- `manifest`: what a manifest store declares (generated, captured, neither), as pure data.
- `verify`: the one module that imports c2pa-python; reads and verifies the manifest in an image's bytes.
- `plugin`: the detector (plugin ``builtin-credentials``): registration, scores, logs.

See docs/credentials.md.
"""
