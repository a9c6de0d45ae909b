"""The trainer's refusals: a run or an evaluation that cannot go as asked (the message says what to change,
naming settings fields as `{field}`; shared.errors). Every module of the trainer may raise them."""

from shared.errors import UserError


class TrainError(UserError):
    """A run that cannot start or go on as asked; the message says what to change."""


class EvalError(UserError):
    """An evaluation that cannot run as asked (missing fields, a missing extra...)."""
