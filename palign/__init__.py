"""palign: P-ALIGN long-chain reasoning distillation as a Ray pipeline."""

__version__ = "0.1.0"
