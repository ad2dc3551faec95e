"""fsrl: Feature Steering with RL. Steer a frozen LM through the features of a frozen SAE."""

__version__ = "0.1.0"
