"""NIRNet's training data side (arXiv 2503.09314): the noise-based imprint simulator.

- `residuals`: where an imprint is measured, behind one `ResidualSource` interface: against a fixed
  denoiser, through an autoencoder trained here (`autoencoder`), or through an operator-supplied VAE.
- `imprint`: the radial frequency bands, per-band per-channel zero-mean Laplace scales (`ImprintStats`,
  JSON beside a model and named in its card), and `ImprintSimulator`, which fuses sources with Dirichlet
  weights and a scale jitter and adds band-shaped noise to real images: content-matched "fake" samples.
- `groups`: fitting one `ImprintStats` per generator from a labelled dataset, on native-pixel crops.
- `recipe`, `train`: ``streamguard train nirnet``: imprint statistics fitted on the training split, native
  crops (the served contract's) plus simulated content-matched fakes, the loop with checkpoints and early
  stopping, calibration and the files the `builtin-nirnet` plugin loads. `train.train_on_splits` is the run
  on given splits, for leave-one-source-out folds.

Serving never imports this package. The simulator modules import nothing from serving's NIRNet; the trainer
uses its model, files and contract, so that it writes and prepares exactly what serving reads.
"""
