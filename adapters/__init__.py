"""Model adapters: one per Hugging Face ``config.model_type`` (see the adapters issue)."""
