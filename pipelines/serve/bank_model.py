"""The code MLflow runs to load a clpipe bank model (MLflow's models from code: no pickle);
the model is `pipelines.serve.mlflow_model.BankModel`, whose code travels with it."""

from mlflow.models import set_model

from pipelines.serve.mlflow_model import BankModel

set_model(BankModel())
