"""The ``tml`` commands, one module per area; each has ``register(sub, common)``."""
