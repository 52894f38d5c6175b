"""fewshot-nsl: a few-shot benchmark suite around Neural Similarity Learning (NeurIPS 2019)."""
__version__ = "0.1.0"
