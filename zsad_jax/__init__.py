"""zsad_jax: zero-shot anomaly detection on JAX/Flax NNX.

Frozen vision(-language) backbones (CLIP, DINOv3) plus small trained heads give an image score and a
pixel anomaly map for product categories never seen in training.
"""

__version__ = "0.1.0"
