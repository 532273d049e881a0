"""After training: a checkpoint as a transformers LLaVA folder that prompts the way it was trained (`cli.py`,
`prompting.py`), with a model card saying how it was made (`model_card.py`), and LoRA adapters merged into
their base (`merge_adapter.py`)."""
