"""dashchat: an OpenAI-compatible chat server with its own PyTorch inference engine."""

__version__ = "0.1.0"
