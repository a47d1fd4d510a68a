"""The one exception the library raises for bad input."""


class CostError(ValueError):
    """Bad input to a cost: the message says what was expected and what was given.

    A cost that raises CostError has not changed any of its state.
    """
