"""The code MLflow runs to serve a logged classifier ("models from code": no pickle in the model).

`mlflow.pyfunc.load_model` and `mlflow models serve` execute this file from the model's folder;
the project's own loader (`serving.load`) never does.
"""

import mlflow

from src.mlflow_io.serving import TextClassifier

mlflow.models.set_model(TextClassifier())
