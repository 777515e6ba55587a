"""Backbones pretrained by zsad_jax itself on procedural normal images (``backbone``)."""
