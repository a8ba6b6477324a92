"""Giving a base model its FastMTP head: self-distilled data, the objective, the training loop."""


class TrainError(ValueError):
    """A problem with the options, the data or the output folder, explained for the user."""
