"""Training the prompts, Bi-CMCI and Conv-Adapter (paper §2.5); see ``docs/training.md``."""

from kanoclip.training.trainer import TrainConfig, TrainProgress, TrainResult, train

__all__ = ["TrainConfig", "TrainProgress", "TrainResult", "train"]
