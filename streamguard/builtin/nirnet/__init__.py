"""The built-in NIRNet detector (arXiv 2503.09314): a noise-imprint extractor and a hybrid discriminator
(noise, frequency and CLIP-semantic branches) scoring native-resolution crops.

`files` says what a weights directory holds and `detector` what the detector is, both without torch (so the
plugin registers on a worker that judges on Triton); `model` holds the torch modules and `save_model`,
which the trainer (`streamguard.training.nirnet`) imports to write the layout the plugin loads; `backend`
serves it in-process. Serving never imports training.
"""
