"""The shared VLM core: vision tower, projector, LLM splicing, LoRA, LLaVA interop and builders."""
