"""dashchat: an OpenAI-compatible chat server with its own PyTorch inference engine."""

from .engine.cpu.threads import default_openmp_spin

default_openmp_spin()  # before anything imports torch: libgomp reads it when it loads

__version__ = "0.1.0"
