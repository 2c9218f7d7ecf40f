"""otfuse: fuse trained PyTorch models by aligning their neurons with optimal transport."""

from otfuse.errors import OtfuseError

__all__ = ["OtfuseError"]
__version__ = "0.1.0"
