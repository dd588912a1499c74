"""Fine-tuning the CLIP image encoder with LoRA: one trainer, the methods as small pieces.

- `lora`: adapters on the attention projections of the tuned blocks, merged into the weights for serving.
- `vit`: CLIP's vision tower run in parts (tokens, a range of blocks, the pooled embedding).
- `model`: the model under training (frozen prefix, LoRA'd tuned blocks, linear head).
- `prefix_cache`: the frozen prefix's hidden states, computed once per augmented image, on disk.
- `data`: splits and hold-outs, augmentation, batches (from the cache or from pixels).
- `objective`: what a method contributes (token masking, loss); `pinclip` and `mpft` are the two methods.
- `trainer`: the loop (validation, early stopping, checkpoints, resume); `checkpoint` its state on disk.
- `recipe`: the configuration and the whole run; `artifacts`: the files a trained detector ships as.

``streamguard train pin-clip|mpft`` is thin over `recipe.train_detector`; the built-in plugins
(`streamguard.builtin.pinclip`, `streamguard.builtin.mpft`) register it through `streamguard.builtin.finetuned`
(no torch) and load what it writes through `artifacts`.
"""
