"""The project's own error types: each message says what is wrong and how to fix it.

The CLI turns these into one line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""


class FitflowError(Exception):
    """A problem with the user's input that the user can fix."""


class ConfigError(FitflowError):
    """An invalid config value, flag or YAML file."""


class DataError(FitflowError):
    """A data file that cannot be read or trained on as it is."""


class TrainingError(FitflowError):
    """Training cannot go on (a NaN/inf loss, a model that does not fit the data)."""


class TrackingError(FitflowError):
    """The MLflow tracking store cannot be reached or refuses this client."""


class ServerError(FitflowError):
    """A server fitflow starts for a command (the embedded Prefect server) did not come up."""
