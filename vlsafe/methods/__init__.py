"""One LightningModule per method, all over the shared VLM core."""
