"""Mini-ImageNet and custom dataset loaders (to be written)."""
