"""The synthetic shapes world: scenes, samples of every kind, and data modules that write them on first use."""
