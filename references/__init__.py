"""Independent numerical references the tests and benchmarks compare this project against.

- `references.pil`: the release's image chain as PIL and torchvision's PIL functions compute
  it (crops, resize, colour jitter, grayscale, blur, solarize, normalisation).
- `references.torch_modules`: the release's networks, heads, criterion and LARS in PyTorch,
  with its parameter names.
- `references.loss`: the VICRegL criterion as plain NumPy loops.

Not part of the package: nothing under vicregl_jax imports them.
"""
