"""An unmodified MLflow training script: it knows nothing of the sidecar.

Run with MLFLOW_TRACKING_URI set; argv: experiment name, registered model name, number
of metric steps, and optionally a file whose appearance it waits for halfway through the
loop (after writing `<file>.half`), so that a test can break things mid-loop.
Prints one JSON line with what it logged.
"""

import json
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from sklearn.linear_model import LogisticRegression


class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input * 2


def main() -> None:
    experiment, model_name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    gate = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        mlflow.log_params({"lr": 0.001, "gamma": 0.99, "policy": "ppo"})
        for step in range(steps):
            mlflow.log_metric("reward", step * 0.5, step=step)
            if gate is not None and step == steps // 2:
                Path(f"{gate}.half").write_text(run.info.run_id)
                while not gate.exists():
                    time.sleep(0.05)
        mlflow.sklearn.autolog()
        features = np.array([[0.0], [1.0], [2.0], [3.0]])
        LogisticRegression().fit(features, np.array([0, 0, 1, 1]))
        mlflow.sklearn.autolog(disable=True)
        info = mlflow.pyfunc.log_model(
            name="policy",
            python_model=Doubler(),
            pip_requirements=["mlflow"],
            registered_model_name=model_name,
        )
    MlflowClient().set_registered_model_alias(model_name, "champion", info.registered_model_version)
    champion = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    prediction = champion.predict(np.array([1.0, 2.0])).tolist()
    print(
        json.dumps(
            {
                "run_id": run.info.run_id,
                "model_id": info.model_id,
                "version": info.registered_model_version,
                "prediction": prediction,
            }
        )
    )


if __name__ == "__main__":
    main()
