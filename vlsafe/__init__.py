"""vlsafe: one Lightning trainer for safe and honest vision-language models."""
__version__ = "0.1.0"
