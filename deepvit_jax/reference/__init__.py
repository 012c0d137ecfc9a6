"""PyTorch reference models, shared by the parity tests and the benchmarks.

``official`` follows the released DeepViT code module for module, ``timm_vit`` is timm's
ViT layout, ``vit_pytorch`` loads vit-pytorch's DeepViT class. They need PyTorch (the
``torch`` extra); nothing else in the package imports them.
"""
