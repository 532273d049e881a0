"""Sample schema, chat templates, shard I/O, the data module and the synthetic shapes world."""
