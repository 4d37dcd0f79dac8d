"""The project's one error for refusals: a message of one line saying what is wrong and how to fix it.

Standard library only, in a module of its own, so the logged model's code (serving.py, inference.py)
can carry it without the settings module.
"""


class ConfigError(ValueError):
    """A setting, an input or a stored model is wrong; the message is one line saying what and how to fix it."""
