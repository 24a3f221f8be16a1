"""charforge: characters that keep their look, generated on the checkpoint that made them."""

__version__ = "0.1.0"
