"""The training loop behind train.py: arguments, checkpoints with exact resume, and the step loop."""
