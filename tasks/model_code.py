"""MLflow "models from code" entry point for the fitflow pyfunc (see tasks/serving.py).

MLflow executes this file when it loads the model; nothing imports it.
"""

import mlflow.models

from tasks.serving import FitflowModel

mlflow.models.set_model(FitflowModel())
