"""Guards that keep long runs alive on bad data and bad numerics, and the catalogue that proves them.

- `nonfinite.NonFiniteGuard`: a Lightning callback that skips optimizer steps with a NaN/Inf loss or
  gradients and stops, with a checkpoint, when they keep coming.
- `recipe_keys.check_recipe_keys`: names unknown recipe keys and suggests the closest valid one.
- `bad_inputs`: every malformed input vlsafe is tested against (used by tests/reliability and
  tools/reliability_report.py).
"""
