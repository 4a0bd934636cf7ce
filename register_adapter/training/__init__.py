"""Training with the 🤗 ``Trainer``: shared arguments and run-time checks, and the classification task."""
