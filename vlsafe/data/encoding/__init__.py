"""Encoding: how a `Sample` becomes token ids, labels and pixels (chat templates, processor, generic encoders)."""
