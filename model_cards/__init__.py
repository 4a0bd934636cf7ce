"""Model card templates shipped with register_adapter (installed as ``register_adapter.model_cards``)."""
