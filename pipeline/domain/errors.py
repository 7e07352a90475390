"""Exceptions raised by the pure domain layer."""


class DomainError(ValueError):
    """Base class for domain errors: a rule of the science was broken by the data or the config.

    It subclasses ``ValueError`` because every domain error is about a value that is out of
    bounds or malformed; callers (assets, checks, Spark tasks) can catch ``DomainError`` to tell
    a data problem from an infrastructure failure without importing any orchestration code.
    """
