"""A 2-client Flower federation fine-tuning a small GPT-2 on sentences, captured for ``python -m eval audit``."""
