"""Errors caused by user input; each message names the problem and how to fix it."""


class CodetuneError(Exception):
    """Base for mistakes a user can fix; the CLI prints these without a traceback."""


class ConfigError(CodetuneError):
    pass


class DataError(CodetuneError):
    pass


class ModelError(CodetuneError):
    pass
