"""tunelab: fine-tune a language model on your own examples, then prove whether it was worth it."""

__version__ = "0.1.0"
